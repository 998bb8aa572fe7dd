"""The fused low-rank GEMM (kernels/lowrank.py) under the Triton interpreter, against float64 autograd of
the term-by-term formula: y and the gradients of x, W (when trainable), bias, every A, B and gate, on
ragged shapes (in/out not multiples of the 16-wide interpreter tiles), ranks 1 / 8 / 64, one and two
terms, scalar and per-output gates, frozen and trainable W. fp32 and fp16 (the interpreter's bf16 math
is wrong, triton-lang/triton#11584). Plus a float64 gradcheck through the kernels."""

import pytest
import torch

from felix.ops.reference.lowrank import grad_errors, leaves_of, truth_grads
from felix.testing.lowrank_cases import make_case
from felix.ops.reference.tolerances import tolerances

CASES = {  # name: make_case kwargs
    "r8-scalar-gate-bias": dict(ranks=(8,), per_output_gate=(False,)),
    "r1-per-output-gate-frozen": dict(ranks=(1,), per_output_gate=(True,), frozen=True, bias=False),
    "r64-scalar-frozen": dict(lead=(11,), in_f=70, out_f=45, ranks=(64,), per_output_gate=(False,), frozen=True),
    "two-terms-8+3": dict(ranks=(8, 3), per_output_gate=(True, False)),
}
BARS = tolerances("lowrank_linear/interpreter")


def run_triton(case, dy):
    """Worker: felix.lowrank_linear on the Triton backend; y and the gradients of every leaf."""
    import felix

    t, names, leaves = leaves_of(case)
    y = felix.lowrank_linear(t["x"], t["weight"], t["a"], t["b"], t["gate"], bias=t["bias"], backend="triton")
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), dict(zip(names, [g.detach() for g in grads])), t["weight"].requires_grad


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_lowrank_matches_float64(interpret, seed, name, dtype):
    case = make_case(seed, dtype=dtype, **CASES[name])
    dy = torch.randn(*case["x"].shape[:-1], case["weight"].shape[0], generator=torch.Generator().manual_seed(seed)).to(
        dtype
    )
    y, grads, w_trainable = interpret(run_triton, case, dy)
    want_y, want = truth_grads(case, dy)
    assert y.dtype == dtype and w_trainable == (not case["frozen"])
    assert ("weight" in grads) == (not case["frozen"])
    bar = BARS[dtype]
    err = float((y.double() - want_y).abs().max() / want_y.abs().max())
    assert err <= bar, f"y: relative error {err:.3g}"
    assert all(torch.isfinite(g).all() for g in grads.values()), "NaN/Inf in a gradient"
    for k, e in grad_errors(grads, want, case, dy).items():
        assert e <= bar, f"d{k}: relative error {e:.3g} > {bar}"


def triton_gradcheck(seed):
    import felix

    case = make_case(
        seed, lead=(5,), in_f=19, out_f=17, ranks=(3, 2), per_output_gate=(True, False), dtype=torch.float64
    )
    t, names, leaves = leaves_of(case, torch.float64)

    def fn(*args):
        d = dict(zip(names, args))
        return felix.lowrank_linear(
            d["x"],
            d["weight"],
            [d["a0"], d["a1"]],
            [d["b0"], d["b1"]],
            [d["gate0"], d["gate1"]],
            bias=d["bias"],
            backend="triton",
        )

    return torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=True)


def test_gradcheck_float64_through_the_kernels(interpret, seed):
    assert interpret(triton_gradcheck, seed)
