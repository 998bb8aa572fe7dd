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
:func:`textbook_loss` is the independent float64 truth (row-by-row textbook math, autograd gradients) that
tests, the GPU tier and the spec itself are checked against.
:func:`chunked_loss_and_grads` is the ``reference`` backend of ``felix.linear_ce_quail``: chunks of
tokens, each chunk's logits computed, consumed and turned into gradients for h, W and b at once, so at
most ``chunk_size x V`` logits exist at any time (the way the Triton backend works, in plain torch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN


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


REDUCTIONS = ("mean", "sum", "none")


def soft_capped(z: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2, as Liger's fused linear cross-entropy): softcap * tanh(z / softcap);
    softcap 0 (or None) leaves the logits alone."""
    return softcap * torch.tanh(z / softcap) if softcap else z


def full_logits_loss(
    h,
    weight,
    targets,
    whitelist=None,
    margin=DEFAULT_MARGIN,
    lambda_q=DEFAULT_LAMBDA_Q,
    z_loss=0.0,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=0.0,
) -> LossParts:
    """The spec, differentiable by autograd. Math in float32, or float64 for float64 inputs.
    `whitelist` is a bool mask over the vocabulary (or None: no hinge).

    Peers' options (as Liger-Kernel's fused linear cross-entropy): ``softcap`` s > 0 replaces the logits by
    s tanh(z / s) before anything else (margins and hinge included: they are margins of the capped logits);
    ``label_smoothing`` e gives ce_i = (1 - e)(lse_i - z_{i,y_i}) + e (lse_i - mean_j z_{i,j}) (torch's
    F.cross_entropy definition); ``reduction``: "mean" (the module docstring's normalisation: CE and z-loss
    over scored positions, the hinge over whitelisted ones), "sum" (every per-token term summed:
    sum_i ce_i + lambda_q sum_i hinge_i + c sum_i lse_i^2) or "none" (those per-token terms, [N], 0 at
    ignored positions; ce / hinge / z_loss are then [N] too). active_hinge_count and mean_margin are
    reported the same way under every reduction."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = h.to(dt) @ weight.to(dt).t()
    if bias is not None:
        z = z + bias.to(dt)
    z = soft_capped(z, softcap)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(z, dim=1)
    zt = z.gather(1, safe_t[:, None])[:, 0]
    smooth_target = (1 - label_smoothing) * zt + label_smoothing * z.mean(1) if label_smoothing else zt
    ce_i = torch.where(valid, lse - smooth_target, 0)
    best, _ = _first_max_other(z, safe_t)
    marg = zt - best
    if whitelist is None:
        watched = torch.zeros_like(valid)
    else:
        watched = valid & whitelist.to(z.device)[safe_t]
    hinge_i = torch.where(watched, torch.relu(margin - marg), 0)
    z_i = z_loss * torch.where(valid, lse * lse, 0)
    n_ce, n_h = valid.sum(), watched.sum()
    active = (watched & (marg < margin)).sum()
    mean_margin = torch.where(watched, marg, 0).sum() / n_h.clamp_min(1)
    if reduction == "none":
        return LossParts(
            ce_i + lambda_q * hinge_i + z_i, ce_i.detach(), hinge_i.detach(), z_i.detach(), active, mean_margin.detach()
        )
    if reduction == "sum":
        ce, hinge, zl = ce_i.sum(), hinge_i.sum(), z_i.sum()
    else:
        ce, hinge, zl = ce_i.sum() / n_ce.clamp_min(1), hinge_i.sum() / n_h.clamp_min(1), z_i.sum() / n_ce.clamp_min(1)
    total = ce + lambda_q * hinge + zl
    return LossParts(total, ce.detach(), hinge.detach(), zl.detach(), active, mean_margin.detach())


def row_weights(targets, whitelist, ignore_index, reduction, lambda_q, dtype=torch.float32, row_weight=None):
    """Per-row weights of the CE (and z-loss) term and of the hinge term in the total, as device tensors (no
    host synchronisation): valid / n_ce and lambda_q * watched / n_hinge for "mean", the 0/1 masks (times
    lambda_q) otherwise; times `row_weight` (the incoming gradient of a "none" loss) when given.
    Returns (valid, safe targets, watched, ce weight [N], hinge weight [N], 1/n_ce, 1/n_hinge)."""
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).long()
    watched = valid & whitelist[safe_t] if whitelist is not None else torch.zeros_like(valid)
    inv_n_ce = 1.0 / valid.sum().clamp_min(1).to(dtype)
    inv_n_h = 1.0 / watched.sum().clamp_min(1).to(dtype)
    one = torch.ones((), dtype=dtype, device=targets.device)
    ce_w = torch.where(valid, inv_n_ce if reduction == "mean" else one, 0.0)
    h_w = torch.where(watched, lambda_q * (inv_n_h if reduction == "mean" else one), 0.0)
    if row_weight is not None:
        ce_w, h_w = ce_w * row_weight.to(dtype), h_w * row_weight.to(dtype)
    return valid, safe_t, watched, ce_w, h_w, inv_n_ce, inv_n_h


def chunk_logits_grad(z, safe_t, ce_w, h_w, margin, z_loss, label_smoothing=0.0, softcap=0.0):
    """For one chunk of fp32 logits z ``[C, V]`` (raw: soft-capped here, in place): the per-row statistics
    and dL/dz (of the raw logits), written over z.

    Returns (lse, target logit, margin, mean logit, dz). With c_i = ce_w[i] (row i's CE weight, 0 when
    ignored) and p_i = h_w[i] where the margin is below m (else 0): dz = c_i (1 + 2 z_loss lse_i) softmax
    - c_i (1 - e) onehot(y) - c_i e / V + p_i (onehot(best other) - onehot(y)), times 1 - tanh^2 under a
    softcap (the chain rule through s tanh(z / s)). Works in place (one C x V buffer; a second under a
    softcap, for the tanh), since this is the memory-bounded path."""
    v = z.shape[1]
    cap_grad = None
    if softcap:
        z.div_(softcap).tanh_()
        cap_grad = 1.0 - z * z
        z.mul_(softcap)
    lse = torch.logsumexp(z, dim=1)
    zmean = z.mean(1) if label_smoothing else None
    col = safe_t[:, None]
    zt = z.gather(1, col)[:, 0]
    z.scatter_(1, col, float("-inf"))  # hide the target: the best *other* logit
    best, best_idx = z.max(dim=1)  # first maximal index, as torch.argmax
    z.scatter_(1, col, zt[:, None])  # restore
    marg = zt - best
    dz = z.sub_(lse[:, None]).exp_()  # softmax, in place
    dz.mul_((ce_w * (1.0 + 2.0 * z_loss * lse))[:, None])
    if label_smoothing:
        dz.sub_((ce_w * (label_smoothing / v))[:, None])
    push = torch.where(marg < margin, h_w, 0.0)
    dz.scatter_add_(1, col, (-(1.0 - label_smoothing) * ce_w - push)[:, None])
    dz.scatter_add_(1, best_idx[:, None], push[:, None])
    if cap_grad is not None:
        dz.mul_(cap_grad)
    return lse, zt, marg, zmean, dz


def finish_parts(
    lse, zt, marg, zmean, valid, watched, inv_n_ce, inv_n_h, margin, lambda_q, z_loss, reduction, label_smoothing
):
    """From per-row statistics: (parts [6]: loss, ce, hinge, z_loss, active count, mean margin; rows [4, N]:
    per-token loss, ce, hinge, z-loss terms). Shared by every chunked backend."""
    smooth_target = (1 - label_smoothing) * zt + label_smoothing * zmean if label_smoothing else zt
    ce_i = torch.where(valid, lse - smooth_target, 0)
    hinge_i = torch.where(watched, torch.relu(margin - marg), 0)
    z_i = z_loss * torch.where(valid, lse * lse, 0)
    if reduction == "mean":
        ce, hinge, zl = ce_i.sum() * inv_n_ce, hinge_i.sum() * inv_n_h, z_i.sum() * inv_n_ce
    else:
        ce, hinge, zl = ce_i.sum(), hinge_i.sum(), z_i.sum()
    active = (watched & (marg < margin)).sum().to(lse.dtype)
    mean_margin = torch.where(watched, marg, 0).sum() * inv_n_h
    parts = torch.stack([ce + lambda_q * hinge + zl, ce, hinge, zl, active, mean_margin])
    return parts, torch.stack([ce_i + lambda_q * hinge_i + z_i, ce_i, hinge_i, z_i])


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


def chunked_loss_and_grads(
    h,
    weight,
    targets,
    whitelist,
    bias,
    margin,
    lambda_q,
    z_loss,
    ignore_index,
    chunk_size,
    accum_dtype=torch.float32,
    need_grads=True,
    reduction="mean",
    label_smoothing=0.0,
    softcap=0.0,
    row_weight=None,
):
    """Chunked forward that also produces dL/dh, dL/dW, dL/db (for grad_output 1; for a "none" reduction,
    for grad_output `row_weight` [N], or ones).

    Returns (parts [6]: loss, ce, hinge, z_loss, active count, mean margin; dh; dW; db; rows [4, N])."""
    n, v = h.shape[0], weight.shape[0]
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid, safe_t, watched, ce_w, h_w, inv_n_ce, inv_n_h = row_weights(
        targets, whitelist, ignore_index, reduction, lambda_q, dt, row_weight
    )
    acc = dt if dt == torch.float64 else accum_dtype
    dh = torch.empty_like(h) if need_grads else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grads else h.new_empty(0)
    db = torch.zeros(v, dtype=acc, device=h.device) if (need_grads and bias is not None) else h.new_empty(0)
    lse, zt, marg, zmean = (torch.zeros(n, dtype=dt, device=h.device) for _ in range(4))
    w_dt = logits_weight(h, weight, dt)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        hc = h[s:e]
        z = chunk_logits(hc, weight, w_dt, bias, dt)
        lse[s:e], zt[s:e], marg[s:e], zm, dz = chunk_logits_grad(
            z, safe_t[s:e], ce_w[s:e], h_w[s:e], margin, z_loss, label_smoothing, softcap
        )
        if zm is not None:
            zmean[s:e] = zm
        if need_grads:
            g = dz.to(h.dtype)
            dh[s:e] = g @ weight
            dw += (g.t() @ hc).to(acc)
            if bias is not None:
                db += dz.sum(0).to(acc)
    parts, rows = finish_parts(
        lse, zt, marg, zmean, valid, watched, inv_n_ce, inv_n_h, margin, lambda_q, z_loss, reduction, label_smoothing
    )
    return (parts, dh, dw.to(weight.dtype) if need_grads else dw, db.to(bias.dtype) if db.numel() else db, rows)


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


def textbook_loss(
    h,
    weight,
    targets,
    whitelist,
    margin,
    lambda_q,
    z_loss,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=0.0,
):
    """The independent float64 truth of the fused CE + QUAIL loss: textbook math, one row at a time for the hinge
    (no scatter/argmax tricks shared with `full_logits_loss`), autograd for the gradients.
    Returns (loss, ce, hinge, z_loss, active count, mean margin) as float64 tensors (loss differentiable).
    reduction "none": loss, ce, hinge, z_loss are per-token [N] (0 at ignored positions). Label smoothing is
    torch's F.cross_entropy's; the softcap is softcap * tanh(z / softcap) on the logits."""
    z = h.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    n_valid = max(int(valid.sum()), 1)
    ce_i = F.cross_entropy(
        z, targets.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    lse = torch.logsumexp(z, dim=1)
    z_i = z_loss * torch.where(valid, lse**2, 0)
    hinge_i = [z.new_zeros(()) for _ in range(z.shape[0])]
    margins = []
    for i in range(z.shape[0]):
        t = int(targets[i])
        if t == ignore_index or whitelist is None or not bool(whitelist[t]):
            continue
        others = torch.cat([z[i, :t], z[i, t + 1 :]])
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
