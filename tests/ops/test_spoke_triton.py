"""The fused spoke kernels (kernels/spoke.py) under the Triton interpreter, against float64 autograd of the fork's
formula (felix.ops.reference.spoke.spoke_textbook): y and the gradients of h, norm_weight, W_down, W_up and gate_bias,
on ragged shapes (d and the bottleneck width not multiples of the 16-wide interpreter tiles, row counts not multiples of BLOCK_M),
1 spoke of rank 1 up to 4 spokes of rank 64 (width 256, the kernel's limit), fp32 and fp16 (the interpreter's bf16
math is wrong, triton-lang/triton#11584). Plus a float64 gradcheck through the kernels."""

import pytest
import torch

from felix.ops.reference.spoke import SPOKE_INPUTS, truth_grads
from felix.ops.reference.tolerances import max_relative_error, tolerances
from felix.testing.spoke_cases import make_case

CASES = {
    "4x3-d37": dict(lead=(3, 7), d=37, n_spokes=4, rank=3),
    "1x1-d16": dict(lead=(5,), d=16, n_spokes=1, rank=1),
    "2x8-d50": dict(lead=(2, 9), d=50, n_spokes=2, rank=8),
    "4x64-d33": dict(lead=(19,), d=33, n_spokes=4, rank=64),
}
# fp32: IEEE dots, sums of <= 256 terms; fp16: n and silu(z) are rounded to fp16 before their dots (2^-11
# relative each, summed over up to 256 terms), as the reference rounds them.
BARS = tolerances("spoke_residual/interpreter")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}


def run_triton(case, dy):
    import felix

    leaves = [case[k].detach().clone().requires_grad_() for k in SPOKE_INPUTS]
    y = felix.spoke_residual(*leaves, case["n_spokes"], case["eps"], backend="triton")
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), {k: g.detach() for k, g in zip(SPOKE_INPUTS, grads)}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_spoke_matches_float64(interpret, seed, name, dtype):
    case = make_case(seed, dtype=dtype, **CASES[name])
    dy = torch.randn(case["h"].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y, grads = interpret(run_triton, case, dy)
    want_y, want = truth_grads(case, dy)
    assert y.dtype == dtype and all(grads[k].dtype == case[k].dtype for k in SPOKE_INPUTS)
    assert all(torch.isfinite(g).all() for g in grads.values()), "NaN/Inf in a gradient"
    # y = h + an update: y's own rounding to `dtype` (half an ulp of |y|) plus BARS times the update's size
    update = (want_y - case["h"].double()).abs().max()
    excess = ((y.double() - want_y).abs() - UNIT_ROUNDOFF[dtype] * want_y.abs()).max() / update
    assert excess <= BARS[dtype], f"spoke update: relative error {float(excess):.3g} beyond y's rounding"
    for k in SPOKE_INPUTS:
        e = max_relative_error(grads[k], want[k])
        assert e <= BARS[dtype], f"d{k}: relative error {e:.3g} > {BARS[dtype]}"


def triton_gradcheck(seed):
    import felix

    case = make_case(seed, lead=(5,), d=19, n_spokes=2, rank=3, dtype=torch.float64)
    leaves = tuple(case[k].detach().double().requires_grad_() for k in SPOKE_INPUTS)
    return torch.autograd.gradcheck(
        lambda *t: felix.spoke_residual(*t, 2, case["eps"], backend="triton"), leaves, fast_mode=True
    )


def test_gradcheck_float64_through_the_kernels(interpret, seed):
    assert interpret(triton_gradcheck, seed)
