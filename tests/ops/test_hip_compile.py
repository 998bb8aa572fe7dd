"""csrc/hip/quant_matmul.cu compiles for the real targets on this CPU-only machine: RDNA3 ISA for gfx1101
(RX 7800 XT, wave32) with hipcc and an sm_90 cubin (H100) with nvcc, with no scratch and no spills. The
per-kernel register table is printed at the end of the run. Needs hipcc / nvcc (scripts/setup.sh --test
installs hipcc with apt-get where it can); a missing compiler skips with the reason.
"""

import os
import re

import pytest

from conftest import HIP_REPORTS
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS, four_bit_layout
from felix.testing import hip_compile

SOURCE = hip_compile.HIP_SOURCES[0]
# 3 activation dtypes x 2 nibble orders x (4 GEMV widths + 1 GEMM)
EXPECTED_KERNELS = 3 * 2 * 5


@pytest.fixture(scope="module")
def gfx1101():
    if hip_compile.hipcc() is None:
        pytest.skip("hipcc not found: `apt-get install hipcc libamdhip64-dev` (scripts/setup.sh --test does it)")
    return hip_compile.compile_gfx1101(SOURCE)


@pytest.fixture(scope="module")
def sm90():
    if hip_compile.nvcc() is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to check the sm_90 build")
    return hip_compile.compile_sm90(SOURCE)


def test_gfx1101_isa_is_rdna3_wave32_without_scratch(gfx1101):
    asm, rows = gfx1101
    HIP_REPORTS.append(hip_compile.format_table(rows))
    assert '.amdgcn_target "amdgcn-amd-amdhsa--gfx1101"' in asm
    assert re.search(r"^\s+(v_dual_\w+|s_delay_alu)\b", asm, re.M), "no RDNA3-only instruction in the ISA"
    # every instruction inline: a call would need ROCm device libraries that cannot be linked for gfx1101 here
    assert "s_swappc" not in asm and "@rel32" not in asm
    assert len(rows) == EXPECTED_KERNELS, [r.kernel for r in rows]
    for r in rows:
        assert r.wavefront == 32, f"{r.kernel}: wave{r.wavefront}"
        assert 0 < r.registers <= 128, f"{r.kernel}: {r.registers} VGPRs"
        assert r.scalar_registers > 0
        assert r.scratch_bytes == 0 and r.spill_bytes == 0, f"{r.kernel}: scratch {r.scratch_bytes} B"
        assert r.shared_bytes <= 64 * 1024


def test_sm90_cubin_has_no_spills(sm90):
    log, rows = sm90
    HIP_REPORTS.append(hip_compile.format_table(rows))
    assert len(rows) == EXPECTED_KERNELS, log[-2000:]
    for r in rows:
        assert 0 < r.registers <= 255, f"{r.kernel}: {r.registers} registers"
        assert r.spill_bytes == 0 and r.scratch_bytes == 0, f"{r.kernel}: spills {r.spill_bytes} B"


def test_the_source_carries_no_codebook():
    """The value tables come from felix/core/formats.py at run time (a kernel argument): no copy in C."""
    with open(SOURCE) as fh:
        src = fh.read()
    squashed = re.sub(r"[\s.f]", "", src)
    for fmt in QUANT_MATMUL_FORMATS:
        table = four_bit_layout(fmt).table
        for v in table:
            if v != int(v):  # codebook entries such as rq4's 0.12281943
                assert f"{abs(v):.6f}"[:7] not in src, f"{fmt} value {v} appears in {os.path.basename(SOURCE)}"
        run = ",".join(str(int(v)) for v in table[:4])  # integer grids (q4_0, iq4_nl) as a written-out list
        assert all(v != int(v) for v in table) or run not in squashed, f"{fmt} table appears in the source"


def test_torch_binding_compiles_against_this_torch(tmp_path):
    """csrc/hip/quant_matmul_torch.cpp needs only torch/extension.h, so its host C++ is checked here even
    with a CPU torch (the GPU build itself needs a CUDA/ROCm torch: setup.py builds it there)."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    proc = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            *includes,
            "-DTORCH_EXTENSION_NAME=_C_gpu",
            os.path.join(os.path.dirname(SOURCE), "quant_matmul_torch.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
