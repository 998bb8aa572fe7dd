"""Linear cross-entropy + QUAIL margin hinge: the spec (full logits) and the chunked torch path.

For hidden states h ``[N, d]``, output weight W ``[V, d]`` (optional bias ``[V]``), targets y ``[N]``
(``ignore_index`` marks positions without a target) and logits z = h Wᵀ + b:

* ``ce``     = mean over non-ignored i of (lse(z_i) - z_{i, y_i})
* margin_i   = z_{i, y_i} - max_{j != y_i} z_{i, j}   (a tie with the best other token is margin 0)
* ``hinge``  = sum over non-ignored i with y_i whitelisted of max(0, m - margin_i), divided by the number
  of such positions (0 when there are none)
* ``z_loss`` = coefficient * mean over non-ignored i of lse(z_i)^2
* ``loss``   = ce + lambda_q * hinge + z_loss

Reported beside them: ``active_hinge_count`` (whitelisted positions with margin < m, the ones the hinge
pushes) and ``mean_margin`` (mean margin over the whitelisted positions, 0 when there are none).

:func:`full_logits_loss` is the spec: plain differentiable torch on the whole N x V logits. It is what
every other implementation is tested against (in float64), and it is the memory baseline.
:func:`chunked_loss_and_grads` is the ``reference`` backend of ``felix.linear_ce_quail``: chunks of
tokens, each chunk's logits computed, consumed and turned into gradients for h, W and b at once, so at
most ``chunk_size x V`` logits exist at any time (the way the Triton backend works, in plain torch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from felix.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN


class LossParts(NamedTuple):
    """The total and its parts. Only ``loss`` carries gradient; the rest are detached, for logging."""
    loss: torch.Tensor
    ce: torch.Tensor
    hinge: torch.Tensor
    z_loss: torch.Tensor
    active_hinge_count: torch.Tensor
    mean_margin: torch.Tensor


def _first_max_other(z: torch.Tensor, targets: torch.Tensor):
    """Best non-target logit and its index (the first index among equal maxima) per row."""
    other = z.scatter(1, targets[:, None], float("-inf"))
    idx = other.argmax(dim=1)  # torch documents: the first maximal index
    return other.gather(1, idx[:, None])[:, 0], idx


def full_logits_loss(h, weight, targets, whitelist=None, margin=DEFAULT_MARGIN, lambda_q=DEFAULT_LAMBDA_Q, z_loss=0.0,
                     bias=None, ignore_index=-100) -> LossParts:
    """The spec, differentiable by autograd. Math in float32, or float64 for float64 inputs.
    `whitelist` is a bool mask over the vocabulary (or None: no hinge)."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = h.to(dt) @ weight.to(dt).t()
    if bias is not None:
        z = z + bias.to(dt)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(z, dim=1)
    zt = z.gather(1, safe_t[:, None])[:, 0]
    n_ce = valid.sum()
    ce = torch.where(valid, lse - zt, 0).sum() / n_ce.clamp_min(1)
    best, _ = _first_max_other(z, safe_t)
    marg = zt - best
    if whitelist is None:
        watched = torch.zeros_like(valid)
    else:
        watched = valid & whitelist.to(z.device)[safe_t]
    n_h = watched.sum()
    hinge = torch.where(watched, torch.relu(margin - marg), 0).sum() / n_h.clamp_min(1)
    zl = z_loss * torch.where(valid, lse * lse, 0).sum() / n_ce.clamp_min(1)
    total = ce + lambda_q * hinge + zl
    active = (watched & (marg < margin)).sum()
    mean_margin = torch.where(watched, marg, 0).sum() / n_h.clamp_min(1)
    return LossParts(total, ce.detach(), hinge.detach(), zl.detach(), active, mean_margin.detach())


def normalisers(targets, whitelist, ignore_index, dtype=torch.float32):
    """(valid mask, safe targets, watched mask, 1/n_ce, 1/n_hinge) as tensors: no host synchronisation."""
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).long()
    watched = valid & whitelist[safe_t] if whitelist is not None else torch.zeros_like(valid)
    inv_n_ce = 1.0 / valid.sum().clamp_min(1).to(dtype)
    inv_n_h = 1.0 / watched.sum().clamp_min(1).to(dtype)
    return valid, safe_t, watched, inv_n_ce, inv_n_h


def chunk_logits_grad(z, safe_t, valid, watched, inv_n_ce, inv_n_h, margin, lambda_q, z_loss):
    """For one chunk of fp32 logits z ``[C, V]``: the per-row statistics and dL/dz, written over z.

    Returns (lse, target logit, margin, dz). dz = (softmax - onehot(y)) / n_ce + 2 z_loss lse softmax / n_ce
    + lambda_q / n_hinge * (onehot(best other) - onehot(y)) on whitelisted rows with margin < m; 0 on
    ignored rows. Works in place (one C x V buffer), since this is the memory-bounded path."""
    lse = torch.logsumexp(z, dim=1)
    col = safe_t[:, None]
    zt = z.gather(1, col)[:, 0]
    z.scatter_(1, col, float("-inf"))          # hide the target: the best *other* logit
    best, best_idx = z.max(dim=1)              # first maximal index, as torch.argmax
    z.scatter_(1, col, zt[:, None])            # restore
    marg = zt - best
    dz = z.sub_(lse[:, None]).exp_()           # softmax, in place
    dz.mul_(torch.where(valid, inv_n_ce * (1.0 + 2.0 * z_loss * lse), 0.0)[:, None])
    push = torch.where(watched & (marg < margin), lambda_q * inv_n_h, 0.0)
    dz.scatter_add_(1, col, (torch.where(valid, -inv_n_ce, 0.0) - push)[:, None])
    dz.scatter_add_(1, best_idx[:, None], push[:, None])
    return lse, zt, marg, dz


def logits_weight(h, weight, dt):
    """The weight as `chunk_logits` takes it, prepared once per call: None where fp16/bf16 GEMMs on a GPU
    write float32 logits themselves, else the weight in `dt` (no copy when it already is)."""
    return None if (h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)) else weight.to(dt)


def chunk_logits(hc, weight, weight_dt, bias, dt):
    """A chunk's logits in `dt` (float32, or float64 for float64 inputs), never rounded to 16 bits (bf16
    logits are ~0.06 apart at |z| ~ 10: coarse next to a margin of 2, and enough to reorder near-tied
    rivals). `weight_dt` is `logits_weight(...)`: None selects the GPU GEMM with a float32 output."""
    if weight_dt is None:
        z = torch.mm(hc, weight.t(), out_dtype=torch.float32)
    else:
        z = hc.to(dt) @ weight_dt.t()
    if bias is not None:
        z += bias.to(dt)
    return z


def chunked_loss_and_grads(h, weight, targets, whitelist, bias, margin, lambda_q, z_loss, ignore_index,
                           chunk_size, accum_dtype=torch.float32, need_grads=True):
    """Chunked forward that also produces dL/dh, dL/dW, dL/db (for grad_output 1).

    Returns (parts [6] float32: loss, ce, hinge, z_loss, active count, mean margin; dh; dW; db)."""
    n, v = h.shape[0], weight.shape[0]
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid, safe_t, watched, inv_n_ce, inv_n_h = normalisers(targets, whitelist, ignore_index, dt)
    acc = dt if dt == torch.float64 else accum_dtype
    dh = torch.empty_like(h) if need_grads else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grads else h.new_empty(0)
    db = torch.zeros(v, dtype=acc, device=h.device) if (need_grads and bias is not None) else h.new_empty(0)
    sums = torch.zeros(5, dtype=dt, device=h.device)  # ce, hinge, z, active, margin sum
    w_dt = logits_weight(h, weight, dt)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        hc = h[s:e]
        z = chunk_logits(hc, weight, w_dt, bias, dt)
        va, wa = valid[s:e], watched[s:e]
        lse, zt, marg, dz = chunk_logits_grad(z, safe_t[s:e], va, wa, inv_n_ce, inv_n_h, margin, lambda_q, z_loss)
        sums += torch.stack([torch.where(va, lse - zt, 0).sum(), torch.where(wa, torch.relu(margin - marg), 0).sum(),
                             torch.where(va, lse * lse, 0).sum(), (wa & (marg < margin)).sum().to(dt),
                             torch.where(wa, marg, 0).sum()])
        if need_grads:
            g = dz.to(h.dtype)
            dh[s:e] = g @ weight
            dw += (g.t() @ hc).to(acc)
            if bias is not None:
                db += dz.sum(0).to(acc)
    ce, hinge, zl = sums[0] * inv_n_ce, sums[1] * inv_n_h, z_loss * sums[2] * inv_n_ce
    parts = torch.stack([ce + lambda_q * hinge + zl, ce, hinge, zl, sums[3], sums[4] * inv_n_h])
    return parts, dh, dw.to(weight.dtype) if need_grads else dw, db.to(bias.dtype) if db.numel() else db


def clear_margin(h, weight, bias, targets, target: float = 2.0, gap: float = 0.05, whitelist=None) -> float:
    """A hinge margin near `target` that no (whitelisted, if given) position's margin lies within `gap`
    of: the hinge's gradient jumps at margin == m, so random checks keep rounding away from that edge."""
    z = h.double() @ weight.double().t() + (bias.double() if bias is not None else 0)
    valid = targets >= 0
    t = torch.where(valid, targets, 0)
    others = z.scatter(1, t[:, None], float("-inf")).max(1).values
    if whitelist is not None:
        valid = valid & whitelist.to(valid.device)[t]
    margins = (z.gather(1, t[:, None])[:, 0] - others)[valid]
    for k in range(200):
        m = target + (k // 2 + 1) * 0.013 * (1 if k % 2 else -1) if k else target
        if margins.numel() == 0 or float((margins - m).abs().min()) > gap:
            return m
    raise ValueError(f"no margin within +-1.3 of {target} keeps {gap} away from all {margins.numel()} margins")

