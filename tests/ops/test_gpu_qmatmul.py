"""GPU tier: the Triton kernels and the compiled HIP/CUDA extension (felix._C_gpu, when built) against a
float64 reference on the dequantized weights, at decode (M 1-8) and prefill shapes with ragged M and N,
for fp32/fp16/bf16 activations; NaN/Inf checks (known RDNA3 hazards, docs/platform-notes.md). Skipped without a GPU.
"""

import pytest
import torch

import felix
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS
from felix.ops.reference.tolerances import tolerances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")

SHAPES = [(1, 1024, 1024), (3, 2816, 1024), (8, 1000, 2816), (37, 1024, 2816), (300, 517, 1024)]
# relative-to-sum|x||w| bound per activation dtype: output rounding plus (GEMM path) the weights
# rounded to the activation dtype before tl.dot / fp32 FMA sums in the HIP kernels
BOUND = tolerances("quant_matmul/gpu")


def check(y, x, wd, dtype):
    assert y.dtype == dtype and torch.isfinite(y).all(), "NaN/Inf in the output"
    ref = x.double() @ wd.t()
    scale = x.double().abs() @ wd.abs().t()
    err = ((y.double() - ref).abs() / scale.clamp_min(1e-30)).max().item()
    assert err <= BOUND[dtype], f"max error {err:.3g} x sum|x||w| (bound {BOUND[dtype]})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", QUANT_MATMUL_FORMATS)
@pytest.mark.parametrize("backend", ["triton", "hip"])
def test_gpu_quant_matmul_matches_float64(backend, fmt, dtype, gen):
    if not felix.backends()[backend].available:
        pytest.skip(felix.backends()[backend].reason)
    for m, n, k in SHAPES:
        w = (torch.randn(n, k, generator=gen) * 0.02).cuda()
        blocks = felix.quantize(w, fmt)
        wd = felix.dequantize(blocks, fmt, (n, k)).double()
        x = torch.randn(m, k, generator=gen).cuda().to(dtype)
        check(felix.quant_matmul(x, blocks, fmt, n, backend=backend), x, wd, dtype)


def test_gpu_triton_split_k_and_paths_agree(gen):
    from felix.ops.kernels import qmatmul as kernels

    w = (torch.randn(512, 2816, generator=gen) * 0.02).cuda()
    b = felix.quantize(w, "rq4")
    x = torch.randn(4, 2816, generator=gen).cuda().half()
    base = kernels.quant_matmul(x, b, "rq4", 512, path="gemv", split_k=1).float()
    for split in (2, 7):
        assert torch.allclose(
            kernels.quant_matmul(x, b, "rq4", 512, path="gemv", split_k=split).float(), base, atol=2e-3, rtol=2e-3
        )
    assert torch.allclose(kernels.quant_matmul(x, b, "rq4", 512, path="gemm").float(), base, atol=2e-2, rtol=2e-2)


def test_gpu_quant_linear_runs_on_the_gpu(gen):
    lin = torch.nn.Linear(1024, 300).cuda()
    q = felix.QuantLinear.from_linear(lin, "rq4")
    x = torch.randn(2, 5, 1024, generator=gen).cuda().to(torch.bfloat16)
    y = q(x)
    want = torch.nn.functional.linear(x.float(), q.dequantized_weight(), lin.bias.float())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - want).abs().max() <= 2e-2 * want.abs().max()
