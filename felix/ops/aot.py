"""Ahead-of-time compilation of Felix's Triton kernels for the real targets, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget(...))` runs Triton's whole pipeline to AMD GCN
assembly (gfx1101, the RX 7800 XT) or PTX + cubin (sm_90, H100) on a CPU-only machine. This module
compiles a kernel spec and reads the resource report a kernel author cares about: registers,
LDS / shared memory, scratch spills, occupancy, and whether matrix instructions (WMMA on RDNA3,
wgmma/mma on Hopper) were emitted.

A kernel spec is a dict, as each kernels/ module's `aot_specs()` returns:
``{"name", "fn", "signature": {arg: "*fp32" | "i32" | "constexpr" ...}, "constexprs": {...},
"options": {...}}``, optionally ``"aligned": [pointer arg names]`` (16-byte-aligned pointers, as the
JIT would specialize them), plus ``"expects_matrix_instructions": True`` for kernels built on ``tl.dot``
(the AOT test then requires WMMA on gfx1101 and mma/wgmma on sm_90).
"""

from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import felix.ops.kernels

TARGETS = {
    "gfx1101": ("hip", "gfx1101", 32),  # RDNA3, Navi 32: RX 7800 XT (wave32)
    "sm_90": ("cuda", 90, 32),  # Hopper: H100 / H200
}

# Which launch-config entry (kernels/*.py LAUNCH_CONFIGS) each target compiles with.
ARCH_KEYS = {"gfx1101": "gfx11", "sm_90": "sm90"}


def kernel_modules() -> list[str]:
    """Every Triton kernel family in kernels/ (installed as felix.ops.kernels): a new module needs only an
    `aot_specs(arch)` function to be compiled by the AOT test and `felix aot-report`."""
    return sorted(m.name for m in pkgutil.iter_modules(felix.ops.kernels.__path__) if not m.name.startswith("_"))


# Per-workgroup LDS on RDNA3 and the largest opt-in shared memory per block on H100.
LDS_LIMIT_BYTES = {"gfx1101": 64 * 1024, "sm_90": 227 * 1024}


@dataclass
class ResourceReport:
    kernel: str
    target: str
    registers: int  # VGPRs (gfx1101) / registers per thread (sm_90)
    scalar_registers: int  # SGPRs (gfx1101); 0 on sm_90
    shared_bytes: int  # LDS / static shared memory per workgroup
    spill_bytes: int  # scratch (gfx1101) / spill stores + loads (sm_90); 0 = no spills
    occupancy: int  # waves per SIMD (gfx1101); 0 where not reported
    matrix_instructions: int  # v_wmma (gfx1101) / mma + wgmma (sm_90) count in the assembly
    num_warps: int
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _triton_target(target: str):
    from triton.backends.compiler import GPUTarget  # local: Triton is heavy and optional

    if target not in TARGETS:
        raise ValueError(f"unknown AOT target {target!r}; targets: {', '.join(TARGETS)}")
    return GPUTarget(*TARGETS[target])


def _attrs(spec: dict) -> dict:
    """Argument hints: names in ``spec["aligned"]`` get ``tt.divisibility=16``, as Triton's JIT gives every
    16-byte-aligned pointer it is launched with (all torch allocations are), so the AOT build vectorizes
    memory access the way the real launch does."""
    names = list(spec["fn"].arg_names)
    return {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("aligned", ())}


def compile_spec(spec: dict, target: str):
    """Compile one kernel spec for `target`; returns Triton's CompiledKernel (asm + metadata)."""
    import triton  # local: Triton is heavy and optional
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs real JIT functions: unset TRITON_INTERPRET")
    src = ASTSource(
        fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=_attrs(spec)
    )
    return triton.compile(src, target=_triton_target(target), options=dict(spec.get("options", {})))


def _amd_report(name: str, compiled) -> ResourceReport:
    asm = compiled.asm["amdgcn"]

    def meta(key: str) -> int:
        m = re.search(rf"^\s*\.{key}:\s*(\d+)", asm, re.M)
        return int(m.group(1)) if m else 0

    occ = re.search(r";\s*Occupancy:\s*(\d+)", asm)
    scratch = re.search(r";\s*ScratchSize:\s*(\d+)", asm)
    spills = meta("vgpr_spill_count") + meta("sgpr_spill_count")
    scratch_bytes = int(scratch.group(1)) if scratch else meta("private_segment_fixed_size")
    return ResourceReport(
        kernel=name,
        target="gfx1101",
        registers=meta("vgpr_count"),
        scalar_registers=meta("sgpr_count"),
        shared_bytes=max(meta("group_segment_fixed_size"), int(getattr(compiled.metadata, "shared", 0) or 0)),
        spill_bytes=scratch_bytes + 4 * spills,
        occupancy=int(occ.group(1)) if occ else 0,
        matrix_instructions=len(re.findall(r"^\s*v_wmma_", asm, re.M)),
        num_warps=compiled.metadata.num_warps,
        details={
            "vgpr_spill_count": meta("vgpr_spill_count"),
            "sgpr_spill_count": meta("sgpr_spill_count"),
            "scratch_bytes": scratch_bytes,
        },
    )


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (it ships with the triton wheel)."""
    from triton.backends.nvidia.compiler import get_ptxas  # local: Triton is heavy and optional

    return get_ptxas(90).path


def _nvidia_report(name: str, compiled) -> ResourceReport:
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run(
            [
                _ptxas(),
                "-v",
                "-arch=sm_90a" if "sm_90a" in ptx else "-arch=sm_90",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    smem = re.search(r"(\d+) bytes smem", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    spill_bytes = int(spill.group(1)) + int(spill.group(2)) if spill else 0
    dyn_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    return ResourceReport(
        kernel=name,
        target="sm_90",
        registers=int(regs.group(1)) if regs else 0,
        scalar_registers=0,
        shared_bytes=max(int(smem.group(1)) if smem else 0, dyn_shared),
        spill_bytes=spill_bytes,
        occupancy=0,
        matrix_instructions=len(re.findall(r"^\s*(?:mma|wgmma)\.", ptx, re.M)),
        num_warps=compiled.metadata.num_warps,
        details={"ptxas": log.strip().splitlines()[-3:]},
    )


def resource_report(spec: dict, target: str) -> ResourceReport:
    compiled = compile_spec(spec, target)
    if target == "gfx1101":
        return _amd_report(spec["name"], compiled)
    return _nvidia_report(spec["name"], compiled)


def format_reports(reports: list[ResourceReport]) -> str:
    """A Markdown table of resource reports."""
    head = (
        "| kernel | target | warps | regs | sregs | LDS/smem B | spill B | occupancy | matrix ops |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.kernel} | {r.target} | {r.num_warps} | {r.registers} | {r.scalar_registers} | "
        f"{r.shared_bytes} | {r.spill_bytes} | {r.occupancy or '-'} | {r.matrix_instructions} |"
        for r in reports
    ]
    return "\n".join([head, *rows])
