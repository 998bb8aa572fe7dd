"""The HIP/CUDA kernels of csrc/hip/quant_matmul.cu, *run* on the CPU: g++ compiles the exact source against
tests/ops/hip_emulation/ (each thread block as CPU threads, real barriers and 32-lane shuffles), and the
results are compared with a float64 reference on the dequantized weights. This checks what the compile
checks cannot: indexing, nibble order, masking of ragged M/N, the warp reduction, fp16/bf16 conversion.
All three formats, fp32/fp16/bf16 activations, GEMV (M <= 8) and tiled GEMM (ragged 64 x 64 tiles).
"""

import os
import shutil
import subprocess

import pytest
import torch

import felix
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS, decode_table, four_bit_layout

HERE = os.path.dirname(__file__)
CSRC = os.path.join(HERE, os.pardir, os.pardir, "csrc", "hip")
EMU = os.path.join(HERE, "hip_emulation")
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# output rounding of the activation dtype, relative
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SHAPES = [(1, 13, 96), (3, 5, 64), (8, 9, 160), (70, 67, 64), (9, 3, 32)]  # (M, N, K); M > 8 -> GEMM


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CPU emulation of the HIP kernels needs it")
    exe = str(tmp_path_factory.mktemp("hip_emulation") / "qmm_emulated")
    proc = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O1",
            "-pthread",
            "-DFELIX_QMM_CPU_EMULATION",
            f"-I{EMU}",
            f"-I{CSRC}",
            "-x",
            "c++",
            os.path.join(CSRC, "quant_matmul.cu"),
            os.path.join(EMU, "harness.cpp"),
            "-o",
            exe,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def run_emulated(exe, tmp_path, x: torch.Tensor, blocks: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    m, k = x.shape
    header = torch.tensor([KINDS[x.dtype], int(four_bit_layout(fmt).pairs), m, n, k], dtype=torch.int32)
    raw = (
        x.contiguous().view(torch.uint8)
        if x.dtype == torch.float32
        else x.contiguous().view(torch.int16).view(torch.uint8)
    )
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(
        header.numpy().tobytes()
        + decode_table(fmt).numpy().tobytes()
        + raw.numpy().tobytes()
        + blocks.contiguous().numpy().tobytes()
    )
    proc = subprocess.run([exe, str(inp), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.frombuffer(bytearray(out.read_bytes()), dtype=x.dtype).reshape(m, n)


@pytest.mark.parametrize("fmt", QUANT_MATMUL_FORMATS)
def test_emulated_hip_kernels_match_float64(harness, tmp_path, fmt, gen):
    for m, n, k in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.05 * torch.exp(0.5 * torch.randn(n, 1, generator=gen))
        blocks = felix.quantize(w, fmt)
        wd = felix.dequantize(blocks, fmt, (n, k)).double()
        x32 = torch.randn(m, k, generator=gen)
        for dtype in KINDS:
            x = x32.to(dtype)
            y = run_emulated(harness, tmp_path, x, blocks, fmt, n)
            ref = x.double() @ wd.t()
            bound = OUT_ROUNDING[dtype] * ref.abs() + 1e-6 * (x.double().abs() @ wd.abs().t()) + 1e-30
            ratio = ((y.double() - ref).abs() / bound).max().item()
            assert torch.isfinite(y).all()
            assert ratio <= 1.0, f"{fmt} {dtype} M={m} N={n} K={k}: error {ratio:.2f}x the bound"
