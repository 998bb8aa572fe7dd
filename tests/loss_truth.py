"""Independent float64 truth for the fused CE + QUAIL loss tests: textbook math, one row at a time for the
hinge (no scatter/argmax tricks shared with felix/reference/loss.py), autograd for the gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from felix.reference.loss import clear_margin  # noqa: F401  (re-exported for the tests)


def naive_loss(h, weight, targets, whitelist, margin, lambda_q, z_loss, bias=None, ignore_index=-100,
               reduction="mean", label_smoothing=0.0, softcap=0.0):
    """Returns (loss, ce, hinge, z_loss, active count, mean margin) as float64 tensors (loss differentiable).
    reduction "none": loss, ce, hinge, z_loss are per-token [N] (0 at ignored positions). Label smoothing is
    torch's F.cross_entropy's; the softcap is softcap * tanh(z / softcap) on the logits."""
    z = h.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    n_valid = max(int(valid.sum()), 1)
    ce_i = F.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=1)
    z_i = z_loss * torch.where(valid, lse ** 2, 0)
    hinge_i = [z.new_zeros(()) for _ in range(z.shape[0])]
    margins = []
    for i in range(z.shape[0]):
        t = int(targets[i])
        if t == ignore_index or whitelist is None or not bool(whitelist[t]):
            continue
        others = torch.cat([z[i, :t], z[i, t + 1:]])
        # max over dim returns (and routes the gradient to) the first maximal index: the tie convention
        m_i = z[i, t] - (others.max(dim=0).values if others.numel() else torch.tensor(float("-inf"), dtype=z.dtype))
        margins.append(m_i)
        # at exactly the margin the hinge is 0 and pushes nothing (the subgradient 0, as "active" is margin < m)
        hinge_i[i] = margin - m_i if float(m_i.detach()) < margin else (margin - m_i) * 0
    hinge_i = torch.stack(hinge_i)
    n_h = len(margins)
    active = sum(1 for m_i in margins if float(m_i.detach()) < margin)
    mean_margin = torch.stack(margins).sum().detach() / n_h if n_h else z.new_zeros(())
    if reduction == "none":
        return ce_i + lambda_q * hinge_i + z_i, ce_i.detach(), hinge_i.detach(), z_i.detach(), active, mean_margin
    if reduction == "sum":
        ce, hinge, zl = ce_i.sum(), hinge_i.sum(), z_i.sum()
    else:
        ce, hinge, zl = ce_i.sum() / n_valid, hinge_i.sum() / max(n_h, 1), z_i.sum() / n_valid
    return ce + lambda_q * hinge + zl, ce.detach(), hinge.detach(), zl.detach(), active, mean_margin


# Logits ~1e4 in float32 are only good to ~1e4 * 2^-24 * d ~ 5e-3 absolute, which the softmax turns into
# relative gradient errors of up to ~5e-4; measured over 1,500 seeds (19 x 8 x 37): max 2.3e-4 (dh).
HUGE_LOGITS_TOL = 1e-3


def make_case(seed: int, n: int, d: int, v: int, whitelist: str = "random", ignored: float = 0.2,
              bias: bool = True, scale: float = 1.0, dtype=torch.float32):
    """Random h, W, b, targets (a fraction ignored) and a whitelist ("none", "empty", "all", "random")."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    wl = {"none": None, "empty": torch.zeros(v, dtype=torch.bool), "all": torch.ones(v, dtype=torch.bool),
          "random": torch.rand(v, generator=g) < 0.4}[whitelist]
    if whitelist == "random":  # make sure some targets are protected
        wl[t[t >= 0][:3]] = True
    return h, w, b, t, wl


def exact_case():
    """Integer logits (h = one-hot rows, so z[i, j] = W[j, i]) with exact margins: row 0 ties target and
    best other (margin 0), row 1 sits exactly at the margin 2, row 2 is above it, row 3 below it."""
    z = torch.tensor([[3.0, 3.0, 1.0, 0.0],   # target 0: tie with token 1 -> margin 0 (< 2: active)
                      [5.0, 1.0, 3.0, 0.0],   # target 0: margin exactly 2 -> not active, zero hinge
                      [0.0, 9.0, 1.0, 2.0],   # target 1: margin 7
                      [1.0, 2.0, 2.5, 0.0],   # target 2: margin 0.5 -> active
                      [4.0, 4.0, 4.0, 4.0]])  # target 3: all equal: margin 0, best other = token 0 (first)
    targets = torch.tensor([0, 0, 1, 2, 3])
    h = torch.eye(5, 5)
    weight = z.t().contiguous()  # [V=4, d=5]: z = h @ W.T
    return h, weight, targets, torch.ones(4, dtype=torch.bool)


def cross_tile_tie_case(v: int = 150):
    """Equal best non-target logits far apart in the vocabulary (different tiles of a row sweep): the
    hinge must push the first of them, as torch.argmax picks it."""
    z = torch.zeros(3, v)
    z[0, 10] = z[0, 100] = 5.0; z[0, 3] = 4.0            # target 3: margin -1, ties at 10 and 100
    z[1, 70] = z[1, 140] = 2.0; z[1, 5] = 1.0            # target 5: ties at 70 and 140 (both past tile 0)
    z[2, v - 1] = 3.0; z[2, 0] = 3.0                     # target 1: ties at 0 and v-1
    targets = torch.tensor([3, 5, 1])
    return torch.eye(3, 3), z.t().contiguous(), targets, torch.ones(v, dtype=torch.bool)
