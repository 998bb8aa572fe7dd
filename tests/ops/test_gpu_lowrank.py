"""GPU tier for the fused low-rank GEMM: Felix shapes (d 1024, ffn 2816, r 8 / 64, thousands of tokens) in
fp16 / bf16 against float64 autograd, with NaN/Inf checks (skipped cleanly without a GPU)."""

import pytest
import torch

import felix
from felix.ops.reference.lowrank import grad_errors, leaves_of, truth_grads
from felix.testing.lowrank_cases import make_case
from felix.ops.reference.tolerances import tolerances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")

BARS = tolerances("lowrank_linear/gpu")


def to_cuda(case):
    return {
        k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda() if isinstance(v, torch.Tensor) else v)
        for k, v in case.items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "in_f,out_f,ranks,frozen", [(1024, 2816, (8,), False), (2816, 1024, (64,), True), (1024, 1000, (8, 16), False)]
)
def test_fused_lowrank_on_gpu(seed, dtype, in_f, out_f, ranks, frozen):
    case = to_cuda(
        make_case(
            seed,
            lead=(4, 509),
            in_f=in_f,
            out_f=out_f,
            ranks=ranks,
            per_output_gate=(True,) + (False,) * (len(ranks) - 1),
            frozen=frozen,
            dtype=dtype,
        )
    )
    t, names, leaves = leaves_of(case)
    y = felix.lowrank_linear(t["x"], t["weight"], t["a"], t["b"], t["gate"], bias=t["bias"], backend="triton")
    dy = torch.randn_like(y)
    grads = dict(zip(names, torch.autograd.grad(y, leaves, dy)))
    want_y, want = truth_grads(case, dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert float((y.detach().double() - want_y).abs().max() / want_y.abs().max()) <= BARS[dtype]
    for k, e in grad_errors(grads, want, case, dy).items():
        assert e <= 4 * BARS[dtype], (k, e)
