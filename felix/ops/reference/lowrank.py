"""SpliceCore low-rank add in torch: the spec of ``felix.lowrank_linear`` and its independent float64 truth.

    y = x Wᵀ + bias + U B_effᵀ,   U = x A_catᵀ

:func:`reference_forward` / :func:`reference_backward` are the ``reference`` backend (the spec the Triton kernel is
tested against): the fused operands (A_cat, B_eff with the gates folded in, see felix/ops/lowrank.py), math in
float32 (float64 for float64 input), U rounded to x's dtype where a kernel feeds it to matrix units.
:func:`lowrank_textbook` is the independent truth: y = x Wᵀ + Σ_t g_t ⊙ (x A_tᵀ) B_tᵀ + b written term by term,
differentiated by autograd in float64 (:func:`truth_grads`); tests, ``felix selftest`` and the GPU tier use it,
and :func:`grad_errors` measures a backend's gradients against it.
"""

from __future__ import annotations

import torch

# the largest total rank of felix.lowrank_linear's low-rank terms: the op layer checks it, the Triton kernel relies on it
MAX_RANK = 64


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(x, weight, bias, a, b):
    acc = _acc(x.dtype)
    u = x.to(acc) @ a.to(acc).t()
    y = x.to(acc) @ weight.to(acc).t() + u.to(x.dtype).to(acc) @ b.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u.to(x.dtype)


def reference_backward(dy, x, weight, a, b, u, need_weight_grad, has_bias):
    acc = _acc(x.dtype)
    dy_, x_, w_, a_, b_, u_ = (t.to(acc) for t in (dy, x, weight, a, b, u))
    p = dy_ @ b_
    dx = dy_ @ w_ + p.to(x.dtype).to(acc) @ a_
    dw = (dy_.t() @ x_).to(weight.dtype) if need_weight_grad else x.new_empty(0)
    dbias = dy_.sum(0).to(dy.dtype) if has_bias else x.new_empty(0)
    return dx.to(x.dtype), dw, dbias, (p.t() @ x_).to(a.dtype), (dy_.t() @ u_).to(b.dtype)


# ------------------------------------------------------------------------------- the truth
def leaves_of(case, dtype=None):
    """For a case dict (x, weight, a, b, gate, bias, frozen; felix.testing.lowrank_cases.make_case): fresh leaf
    tensors (optionally cast) that require grad, in a fixed order, plus the names."""
    conv = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach().clone())
    names, leaves = ["x"], [conv(case["x"]).requires_grad_()]
    w = conv(case["weight"]).requires_grad_(not case["frozen"])
    if not case["frozen"]:
        names.append("weight")
        leaves.append(w)
    a = [conv(t).requires_grad_() for t in case["a"]]
    b = [conv(t).requires_grad_() for t in case["b"]]
    gates = [
        t.detach().clone().double().requires_grad_() if dtype == torch.float64 else t.detach().clone().requires_grad_()
        for t in case["gate"]
    ]
    names += (
        [f"a{i}" for i in range(len(a))] + [f"b{i}" for i in range(len(b))] + [f"gate{i}" for i in range(len(gates))]
    )
    leaves += a + b + gates
    bias = None
    if case["bias"] is not None:
        bias = conv(case["bias"]).requires_grad_()
        names.append("bias")
        leaves.append(bias)
    return dict(x=leaves[0], weight=w, a=a, b=b, gate=gates, bias=bias), names, leaves


def lowrank_textbook(x, weight, a, b, gate, bias):
    """The independent truth: y = x Wᵀ + Σ_t g_t ⊙ (x A_tᵀ) B_tᵀ + b, term by term (no fold of the gates into B,
    no concatenation of the terms), for autograd in float64."""
    y = x @ weight.t()
    for at, bt, g in zip(a, b, gate):
        y = y + g * ((x @ at.t()) @ bt.t())
    return y + bias if bias is not None else y


def truth_grads(case, dy):
    """(y, {leaf name: gradient}) of `lowrank_textbook` in float64 for a case dict (felix.testing.lowrank_cases)
    and output gradient dy."""
    t, names, leaves = leaves_of(case, torch.float64)
    y = lowrank_textbook(**t)
    return y.detach(), dict(zip(names, torch.autograd.grad(y, leaves, dy.double())))


def gate_grad_scales(case, dy) -> dict[str, torch.Tensor]:
    """For each gate, Σ |dy ⊙ u_t| (u_t = (x A_tᵀ) B_tᵀ) over what its gradient sums (everything for a scalar
    gate, each output column for a per-output gate): the size a rounding error of that sum is relative to. A gate
    gradient is a dot product whose terms can cancel, so its error is measured against this, not the result."""
    x, dy = case["x"].double(), dy.double()
    out = {}
    for i, (a, b, g) in enumerate(zip(case["a"], case["b"], case["gate"])):
        terms = (dy * ((x @ a.double().t()) @ b.double().t())).abs().reshape(-1, dy.shape[-1])
        out[f"gate{i}"] = terms.sum() if g.numel() == 1 else terms.sum(0)
    return out


def grad_errors(grads: dict, want: dict, case, dy) -> dict[str, float]:
    """Relative error of every gradient: max |g - truth| over max |truth|, except for gates, whose error is
    taken elementwise against gate_grad_scales (their sums cancel, so |truth| can be far below the rounding)."""
    cpu = {k: [t.cpu() for t in case[k]] for k in ("a", "b", "gate")}
    scales = gate_grad_scales({**cpu, "x": case["x"].cpu()}, dy.cpu())
    out = {}
    for k, g in grads.items():
        diff = (g.double().cpu() - want[k].cpu()).abs()
        ref = scales[k] if k.startswith("gate") else want[k].cpu().abs().max()
        out[k] = float((diff / ref.clamp_min(1e-30)).max())
    return out
