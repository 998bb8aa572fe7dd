"""Random inputs for the low-rank op checks: ragged in/out features, ranks 1 / 8 / 64, one or more terms, scalar
or per-output gates, frozen or trainable W. The truth is felix.ops.reference.lowrank.truth_grads."""

from __future__ import annotations

import torch


def make_case(
    seed: int,
    lead=(3, 7),
    in_f=37,
    out_f=29,
    ranks=(8,),
    per_output_gate=(False,),
    bias=True,
    frozen=False,
    dtype=torch.float32,
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    a = [(torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype) for r in ranks]
    b = [(torch.randn(out_f, r, generator=g) / r**0.5).to(dtype) for r in ranks]
    gates = [torch.randn(out_f if po else 1, generator=g) for po in per_output_gate]
    bb = (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None
    return dict(x=x, weight=w, a=a, b=b, gate=gates, bias=bb, frozen=frozen)
