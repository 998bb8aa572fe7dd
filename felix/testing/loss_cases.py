"""Random and hand-built inputs for the fused CE + QUAIL loss checks (tests and the GPU tier). The truth they are
compared against is felix.ops.reference.loss.textbook_loss; the bounds are in felix.ops.reference.tolerances."""

from __future__ import annotations

import torch


def make_case(
    seed: int,
    n: int,
    d: int,
    v: int,
    whitelist: str = "random",
    ignored: float = 0.2,
    bias: bool = True,
    scale: float = 1.0,
    dtype=torch.float32,
):
    """Random h, W, b, targets (a fraction ignored) and a whitelist ("none", "empty", "all", "random")."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    wl = {
        "none": None,
        "empty": torch.zeros(v, dtype=torch.bool),
        "all": torch.ones(v, dtype=torch.bool),
        "random": torch.rand(v, generator=g) < 0.4,
    }[whitelist]
    if whitelist == "random":  # make sure some targets are protected
        wl[t[t >= 0][:3]] = True
    return h, w, b, t, wl


def exact_case():
    """Integer logits (h = one-hot rows, so z[i, j] = W[j, i]) with exact margins: row 0 ties target and
    best other (margin 0), row 1 sits exactly at the margin 2, row 2 is above it, row 3 below it."""
    z = torch.tensor(
        [
            [3.0, 3.0, 1.0, 0.0],  # target 0: tie with token 1 -> margin 0 (< 2: active)
            [5.0, 1.0, 3.0, 0.0],  # target 0: margin exactly 2 -> not active, zero hinge
            [0.0, 9.0, 1.0, 2.0],  # target 1: margin 7
            [1.0, 2.0, 2.5, 0.0],  # target 2: margin 0.5 -> active
            [4.0, 4.0, 4.0, 4.0],
        ]
    )  # target 3: all equal: margin 0, best other = token 0 (first)
    targets = torch.tensor([0, 0, 1, 2, 3])
    h = torch.eye(5, 5)
    weight = z.t().contiguous()  # [V=4, d=5]: z = h @ W.T
    return h, weight, targets, torch.ones(4, dtype=torch.bool)


def cross_tile_tie_case(v: int = 150):
    """Equal best non-target logits far apart in the vocabulary (different tiles of a row sweep): the
    hinge must push the first of them, as torch.argmax picks it."""
    z = torch.zeros(3, v)
    z[0, 10] = z[0, 100] = 5.0
    z[0, 3] = 4.0  # target 3: margin -1, ties at 10 and 100
    z[1, 70] = z[1, 140] = 2.0
    z[1, 5] = 1.0  # target 5: ties at 70 and 140 (both past tile 0)
    z[2, v - 1] = 3.0
    z[2, 0] = 3.0  # target 1: ties at 0 and v-1
    targets = torch.tensor([3, 5, 1])
    return torch.eye(3, 3), z.t().contiguous(), targets, torch.ones(v, dtype=torch.bool)
