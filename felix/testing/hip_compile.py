"""Compile csrc/hip/ device code for the real targets on a machine without a GPU, and read the resource use.

* gfx1101 (RX 7800 XT, RDNA3) with Debian's ROCm 5.2 `hipcc` (docs/platform-notes.md): ``HIP_PLATFORM=amd hipcc
  --offload-arch=gfx1101 -nogpulib --cuda-device-only -O3 -S`` gives the ISA plus per-kernel metadata
  (VGPRs, SGPRs, scratch, LDS, wavefront size). Full device objects for gfx1101 cannot be linked with
  ROCm 5.2, so the source calls no device-library function (the check fails if one appears).
* sm_90 (H100) with `nvcc -cubin -Xptxas -v`: registers, spills, shared memory per kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
HIP_SOURCES = [os.path.join(REPO, "csrc", "hip", "quant_matmul.cu")]


@dataclass
class KernelResources:
    kernel: str  # demangled name
    target: str
    registers: int  # VGPRs (gfx1101) / registers per thread (sm_90)
    scalar_registers: int
    shared_bytes: int  # LDS / static shared memory
    scratch_bytes: int  # private segment (gfx1101) / stack frame (sm_90)
    spill_bytes: int  # VGPR+SGPR spill count * 4 (gfx1101) / spill stores + loads (sm_90)
    wavefront: int  # 32 on gfx1101 wave32; 32 on sm_90


def hipcc() -> str | None:
    return shutil.which("hipcc")


def nvcc() -> str | None:
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [o or n for o, n in zip(out, names)]


def compile_gfx1101(source: str, arch: str = "gfx1101") -> tuple[str, list[KernelResources]]:
    """Returns (assembly text, per-kernel resources) of `source` compiled for `arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.s")
        env = dict(os.environ, HIP_PLATFORM="amd")
        proc = subprocess.run(
            [hipcc(), f"--offload-arch={arch}", "-nogpulib", "--cuda-device-only", "-O3", "-S", source, "-o", out],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"hipcc failed for {arch}:\n{proc.stderr[-4000:]}")
        with open(out) as fh:
            asm = fh.read()
    meta = asm[asm.index("amdhsa.kernels:") :]
    entries = re.split(r"\n  - \.args:", meta)[1:]
    rows = []
    for ent in entries:

        def get(key: str, default="0") -> str:
            m = re.search(rf"^\s+\.{key}:\s+(\S+)", ent, re.M)
            return m.group(1) if m else default

        spills = int(get("vgpr_spill_count")) + int(get("sgpr_spill_count"))
        rows.append(
            KernelResources(
                get("name", "?"),
                arch,
                int(get("vgpr_count")),
                int(get("sgpr_count")),
                int(get("group_segment_fixed_size")),
                int(get("private_segment_fixed_size")),
                4 * spills,
                int(get("wavefront_size")),
            )
        )
    for r, name in zip(rows, demangle([r.kernel for r in rows])):
        r.kernel = name
    return asm, rows


def compile_sm90(source: str) -> tuple[str, list[KernelResources]]:
    """Returns (ptxas log, per-kernel resources) of `source` compiled to an sm_90 cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [nvcc(), "-arch=sm_90", "-cubin", "-O3", "-Xptxas", "-v", source, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_90:\n{log[-4000:]}")
    rows = []
    for block in re.split(r"ptxas info\s+: Compiling entry function ", log)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)
        regs = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        rows.append(
            KernelResources(
                name,
                "sm_90",
                int(regs.group(1)) if regs else 0,
                0,
                int(smem.group(1)) if smem else 0,
                int(stack.group(1)) if stack else 0,
                int(stack.group(2)) + int(stack.group(3)) if stack else 0,
                32,
            )
        )
    for r, name in zip(rows, demangle([r.kernel for r in rows])):
        r.kernel = name
    return log, rows


def short_name(kernel: str) -> str:
    """'void felix_qmm::qmm_gemv<1, 8, true>(...)' -> 'qmm_gemv<f16, M<=8, pairs>'."""
    m = re.search(r"(qmm_\w+)<([^>]*)>", kernel)
    if not m:
        return kernel
    args = [a.strip() for a in m.group(2).split(",")]
    kind = {"0": "f32", "1": "f16", "2": "bf16"}.get(args[0], args[0])
    order = "pairs" if args[-1] == "true" else "halves"
    mid = [f"M<={a}" for a in args[1:-1]]
    return f"{m.group(1)}<{', '.join([kind, *mid, order])}>"


def format_table(rows: list[KernelResources]) -> str:
    head = (
        "| kernel | target | regs (VGPR) | SGPR | LDS/smem B | scratch B | spill B | wave |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    return "\n".join(
        [
            head,
            *(
                f"| {short_name(r.kernel)} | {r.target} | {r.registers} | {r.scalar_registers} | "
                f"{r.shared_bytes} | {r.scratch_bytes} | {r.spill_bytes} | {r.wavefront} |"
                for r in rows
            ),
        ]
    )
