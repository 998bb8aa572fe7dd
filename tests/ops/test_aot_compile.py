"""Every Triton kernel compiles ahead of time for the real targets, gfx1101 (RX 7800 XT, RDNA3, wave32)
and sm_90 (H100), on this CPU-only machine, with no register spills and within the LDS budget.
The resource report (registers, LDS/shared memory, spills, occupancy) is printed at the end of the run.
"""

import pytest

from conftest import AOT_REPORTS
from felix.ops.aot import LDS_LIMIT_BYTES, TARGETS, kernel_modules

# Every module in kernels/ (installed as felix.ops.kernels) is compiled: a new kernel family needs only
# an `aot_specs(arch)` function to be checked here.
KERNEL_MODULES = kernel_modules()


def compile_module(module: str, target: str):
    """Runs in a worker where TRITON_INTERPRET is unset: compile every spec of felix.ops.kernels.<module>."""
    import importlib

    from felix.ops import aot

    mod = importlib.import_module(f"felix.ops.kernels.{module}")
    reports = []
    for spec in mod.aot_specs(aot.ARCH_KEYS[target]):
        r = aot.resource_report(spec, target).as_dict()
        r["details"]["expects_matrix_instructions"] = bool(spec.get("expects_matrix_instructions", False))
        reports.append(r)
    return reports


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_compile_without_spills(compiled_triton, module, target):
    reports = compiled_triton(compile_module, module, target)
    AOT_REPORTS.extend(reports)
    assert reports, f"felix.ops.kernels.{module}.aot_specs() is empty"
    for r in reports:
        assert r["target"] == target
        assert r["registers"] > 0, f"{r['kernel']}: no register count parsed for {target}"
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes on {target}"
        assert r["shared_bytes"] <= LDS_LIMIT_BYTES[target], f"{r['kernel']} needs {r['shared_bytes']} B of LDS"
        if r["details"].get("expects_matrix_instructions"):
            # GEMM-shaped kernels (tl.dot) must reach the matrix units: v_wmma on RDNA3, mma/wgmma on Hopper
            assert r["matrix_instructions"] > 0, f"{r['kernel']}: no matrix instructions emitted on {target}"
