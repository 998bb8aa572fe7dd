"""Independent float64 truth for the low-rank op tests: y = x Wᵀ + b + Σ_t g_t ⊙ (x A_tᵀ) B_tᵀ written
term by term with autograd, and a random-case generator (ragged in/out, ranks 1 / 8 / 64, gates)."""
from __future__ import annotations

import torch


def make_case(seed: int, lead=(3, 7), in_f=37, out_f=29, ranks=(8,), per_output_gate=(False,), bias=True,
              frozen=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    a = [(torch.randn(r, in_f, generator=g) / in_f ** 0.5).to(dtype) for r in ranks]
    b = [(torch.randn(out_f, r, generator=g) / r ** 0.5).to(dtype) for r in ranks]
    gates = [torch.randn(out_f if po else 1, generator=g) for po in per_output_gate]
    bb = (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None
    return dict(x=x, weight=w, a=a, b=b, gate=gates, bias=bb, frozen=frozen)


def leaves_of(case, dtype=None):
    """Fresh leaf tensors (optionally cast) that require grad, in a fixed order, plus the names."""
    conv = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach().clone())
    names, leaves = ["x"], [conv(case["x"]).requires_grad_()]
    w = conv(case["weight"]).requires_grad_(not case["frozen"])
    if not case["frozen"]:
        names.append("weight"); leaves.append(w)
    a = [conv(t).requires_grad_() for t in case["a"]]
    b = [conv(t).requires_grad_() for t in case["b"]]
    gates = [t.detach().clone().double().requires_grad_() if dtype == torch.float64 else
             t.detach().clone().requires_grad_() for t in case["gate"]]
    names += [f"a{i}" for i in range(len(a))] + [f"b{i}" for i in range(len(b))] + [f"gate{i}" for i in range(len(gates))]
    leaves += a + b + gates
    bias = None
    if case["bias"] is not None:
        bias = conv(case["bias"]).requires_grad_()
        names.append("bias"); leaves.append(bias)
    return dict(x=leaves[0], weight=w, a=a, b=b, gate=gates, bias=bias), names, leaves


def naive(x, weight, a, b, gate, bias):
    y = x @ weight.t()
    for at, bt, g in zip(a, b, gate):
        y = y + g * ((x @ at.t()) @ bt.t())
    return y + bias if bias is not None else y


def truth_grads(case, dy):
    t, names, leaves = leaves_of(case, torch.float64)
    y = naive(**t)
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
