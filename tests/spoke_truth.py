"""Independent float64 truth for the spoke op tests: the fork's formula written naively with autograd
(src/models/felix.cpp: rms_norm * weight, mul_mat, silu, mul_mat, scale 1/S, sigmoid gate), and random cases
with ragged d and bottleneck widths."""
from __future__ import annotations

import torch

NAMES = ("h", "norm_weight", "w_down", "w_up", "gate_bias")


def make_case(seed: int, lead=(3, 7), d=37, n_spokes=4, rank=3, dtype=torch.float32, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    r = n_spokes * rank
    h = (torch.randn(*lead, d, generator=g) * 2.0).to(dtype)
    return dict(h=h, norm_weight=1 + 0.3 * torch.randn(d, generator=g),
                w_down=(torch.randn(r, d, generator=g) / d ** 0.5).to(dtype),
                w_up=(torch.randn(d, r, generator=g) / r ** 0.5).to(dtype),
                gate_bias=torch.randn(1, generator=g), n_spokes=n_spokes, eps=eps)


def naive(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps):
    normed = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * norm_weight
    up = torch.nn.functional.silu(normed @ w_down.t()) @ w_up.t()
    return h + torch.sigmoid(gate_bias) * up / n_spokes


def truth(case, dy):
    leaves = [case[k].detach().double().requires_grad_() for k in NAMES]
    y = naive(*leaves, case["n_spokes"], case["eps"])
    return y.detach(), dict(zip(NAMES, torch.autograd.grad(y, leaves, dy.double())))


def rel(got, want) -> float:
    return float((got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))
