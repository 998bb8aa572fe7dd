"""Random inputs for the spoke op checks: ragged d and bottleneck widths. The truth is
felix.ops.reference.spoke.truth_grads."""

from __future__ import annotations

import torch


def make_case(seed: int, lead=(3, 7), d=37, n_spokes=4, rank=3, dtype=torch.float32, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    r = n_spokes * rank
    h = (torch.randn(*lead, d, generator=g) * 2.0).to(dtype)
    return dict(
        h=h,
        norm_weight=1 + 0.3 * torch.randn(d, generator=g),
        w_down=(torch.randn(r, d, generator=g) / d**0.5).to(dtype),
        w_up=(torch.randn(d, r, generator=g) / r**0.5).to(dtype),
        gate_bias=torch.randn(1, generator=g),
        n_spokes=n_spokes,
        eps=eps,
    )
