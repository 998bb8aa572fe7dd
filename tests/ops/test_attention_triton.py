"""Triton attention kernels under the interpreter (TRITON_INTERPRET=1): output, log-sum-exp and all
three gradients against float64 math, on tiny ragged shapes (T not a multiple of the 16-wide tiles),
causal and not, grouped-query and not; plus gradcheck in float64 through the kernels.

fp32 and fp16 only: bf16 math is wrong in the interpreter (triton-lang/triton#11584); bf16 runs on
the GPU tier. Each case runs in an isolated worker (an out-of-bounds access would kill the process).
"""

import pytest
import torch

from felix.ops.reference.tolerances import tolerance

# (B, H, H_kv, T_q, T_k, D, causal)
CASES = [
    (1, 4, 2, 19, 19, 32, True),  # GQA, ragged, causal
    (2, 2, 2, 7, 7, 64, False),  # T < one tile
    (1, 2, 1, 33, 33, 32, True),  # MQA, three tiles, ragged
    (1, 1, 1, 1, 1, 32, True),  # a single token
    (1, 2, 2, 17, 17, 64, True),
    (1, 4, 2, 5, 23, 32, False),  # cross attention, T_q != T_k
    (1, 2, 1, 18, 18, 128, True),
]


def case_errors(case, dtype_name: str, seed: int):
    """Runs in the interpreter worker: max |kernel - float64| for out, lse, dq, dk, dv, relative to the
    largest |reference| value of each (at least 1: with one key, dq and dk are exactly 0), through
    felix.attention(backend='triton') and autograd."""
    import felix
    from felix.ops.reference.attention import attention_textbook

    B, H, H_kv, T_q, T_k, D, causal = case
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T_q, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, T_k, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, T_k, D, generator=g).to(dtype)
    dout = torch.randn(B, H, T_q, D, generator=g)
    scale = 0.7 / D**0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = felix.attention(*leaves, causal=causal, scale=scale, backend="triton")
    out.backward(dout.to(dtype))
    _, lse = felix.ops.attention._attention_fwd_op(q, k, v, causal, scale, "triton")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_textbook(*ref_leaves, causal, scale)
    ref_out.backward(dout.to(dtype).double())
    pairs = {"out": (out, ref_out), "lse": (lse, ref_lse)}
    pairs.update({f"d{n}": (t.grad, r.grad) for n, t, r in zip("qkv", leaves, ref_leaves)})
    report = {"dtype_ok": out.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)}
    for name, (got, want) in pairs.items():
        scale_ = max(float(want.detach().abs().max()), 1.0)
        report[name] = float((got.detach().double() - want.detach()).abs().max()) / scale_
        report[name + "_finite"] = bool(torch.isfinite(got).all())
    return report


# Relative max error bars (measured: fp32 <= 8e-7, fp16 <= 5.5e-4): fp32 math is exact to ~1e-6; fp16
# inputs keep fp32 accumulation, and the fp16 rounding of P / dS before their dots and of the outputs
# costs about one fp16 ulp (2^-11 = 4.9e-4).
BARS = {name: tolerance("attention/interpreter", getattr(torch, name)) for name in ("float32", "float16")}


# Every case in fp32 and fp16, except head_dim 128 (fp32 only: one such case is enough under the slow interpreter)
DTYPE_CASES = [
    (case, dtype) for case in CASES for dtype in ("float32", "float16") if not (dtype == "float16" and case[5] == 128)
]


@pytest.mark.parametrize(
    "case,dtype",
    DTYPE_CASES,
    ids=lambda c: c if isinstance(c, str) else "B{}H{}kv{}T{}x{}D{}{}".format(*c[:6], "c" if c[6] else ""),
)
def test_kernels_match_float64(interpret, case, dtype, seed):
    r = interpret(case_errors, case, dtype, seed)
    assert r.pop("dtype_ok")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert r[name + "_finite"], f"{name} has NaN/Inf"
        assert r[name] <= BARS[dtype], f"{name}: relative error {r[name]:.3g} > {BARS[dtype]} ({r})"


def case_gradcheck(seed: int):
    import felix

    g = torch.Generator().manual_seed(seed)
    ok = []
    for H, H_kv, T, causal in [(2, 1, 5, True), (2, 2, 4, False)]:
        q = torch.randn(1, H, T, 32, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, H_kv, T, 32, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, H_kv, T, 32, generator=g, dtype=torch.float64, requires_grad=True)
        fn = lambda q, k, v: felix.attention(q, k, v, causal=causal, backend="triton")  # noqa: E731
        # fast mode (random projections of the Jacobian): a few interpreted launches, not 2 per input element
        ok.append(torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True))
    return ok


def test_gradcheck_float64_through_the_kernels(interpret, seed):
    assert interpret(case_gradcheck, seed) == [True, True]


def case_deterministic(seed: int):
    """Two backward passes give bit-identical gradients (no atomics)."""
    from felix.ops.kernels import attention as kernels

    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 4, 21, 32, generator=g) for _ in range(4))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    out, lse = kernels.forward(q, k, v, True, 0.2)
    a = kernels.backward(do, q, k, v, out, lse, True, 0.2)
    b = kernels.backward(do, q, k, v, out, lse, True, 0.2)
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_backward_is_deterministic(interpret, seed):
    assert interpret(case_deterministic, seed)


def case_register_saving_variants(seed: int):
    """The variant gfx11 uses at head_dim 128 computes the same thing: every backward kernel forced to
    stream head_dim slices (STREAM=16), against float64."""
    from felix.ops.kernels import attention as kernels

    saved = kernels.LAUNCH_CONFIGS["interpreter"]
    kernels.LAUNCH_CONFIGS["interpreter"] = {
        d: {k: dict(c, stream=16) for k, c in cfgs.items()} for d, cfgs in saved.items()
    }
    try:
        return case_errors((1, 4, 2, 21, 21, 32, True), "float32", seed)
    finally:
        kernels.LAUNCH_CONFIGS["interpreter"] = saved


def test_register_saving_variants_match_float64(interpret, seed):
    r = interpret(case_register_saving_variants, seed)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert r[name + "_finite"] and r[name] <= BARS["float32"], (name, r)
