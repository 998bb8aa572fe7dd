"""GPU tier for the fused spoke kernels: Felix shapes (d 1024 / 1280, 4 spokes of rank 8 / 64, thousands of
tokens, a row count that is not a multiple of BLOCK_M) in fp32 / fp16 / bf16 against float64 autograd of the fork's
formula, with NaN/Inf checks (skipped cleanly without a GPU)."""

import pytest
import torch

import felix
from felix.ops.reference.spoke import SPOKE_INPUTS, truth_grads
from felix.ops.reference.tolerances import max_relative_error, tolerances
from felix.testing.spoke_cases import make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")

BARS = tolerances("spoke_residual/gpu")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,n_spokes,rank", [(1024, 4, 8), (1280, 4, 64), (1000, 2, 24)])
def test_fused_spoke_on_gpu(seed, dtype, d, n_spokes, rank):
    case = make_case(seed, lead=(4, 509), d=d, n_spokes=n_spokes, rank=rank, dtype=dtype)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    leaves = [cuda[k].detach().clone().requires_grad_() for k in SPOKE_INPUTS]
    y = felix.spoke_residual(*leaves, n_spokes, case["eps"], backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    want_y, want = truth_grads(case, dy.cpu())
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    update = (want_y - case["h"].double()).abs().max()
    excess = ((y.detach().double().cpu() - want_y).abs() - UNIT_ROUNDOFF[dtype] * want_y.abs()).max() / update
    assert excess <= BARS[dtype]
    for k, g in zip(SPOKE_INPUTS, grads):
        assert max_relative_error(g, want[k]) <= 4 * BARS[dtype], k
