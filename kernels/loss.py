"""Fused linear cross-entropy + QUAIL margin hinge in Triton, chunked so the N x V logits never exist.

Per chunk of tokens: the chunk's logits ``[C, V]`` come from one matmul (fp32 output), then
``_ce_quail_rows`` runs one program per row:

* pass 1, one online sweep over the vocabulary: running max and rescaled sum of exponentials (the
  log-sum-exp), the target logit, and the best non-target logit with its index (the first index among
  equal maxima, as torch.argmax);
* pass 2 overwrites the row's logits with dL/dz: ``(softmax - onehot(y)) / n_ce`` (+ the z-loss term
  ``2 c lse softmax / n_ce``) + ``lambda_q / n_hinge`` on the best other token and minus that on the
  target where the row's target is whitelisted and its margin is below m.

The chunk's dL/dz then gives dL/dh (one matmul) and accumulates dL/dW and dL/db, during the forward
(as Liger-Kernel's fused linear cross-entropy does), so the backward only scales stored gradients.
Per-row weights (the normalisers, lambda_q and the reduction folded in) are device tensors read by the kernel:
no host synchronisation anywhere in the loop.

Launch configuration (vocabulary tile, warps, logits budget per chunk) is data, per architecture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.ops.dispatch import arch_key
from felix.ops.reference.loss import chunk_logits, finish_parts, logits_weight, row_weights

# BLOCK_V: vocabulary elements per step of a row's sweep; chunk_logits_bytes: the fp32 logits of one
# chunk (rows x V x 4 bytes) that the default chunk size keeps to (the only N x V-shaped buffer).
LAUNCH_CONFIGS = {
    "interpreter": {"BLOCK_V": 64, "num_warps": 1, "chunk_logits_bytes": 1 << 20},
    "gfx11": {"BLOCK_V": 1024, "num_warps": 4, "chunk_logits_bytes": 256 << 20},  # RX 7800 XT: 16 GB
    "sm90": {"BLOCK_V": 2048, "num_warps": 8, "chunk_logits_bytes": 1 << 30},  # H100: 80 GB
    "default": {"BLOCK_V": 1024, "num_warps": 4, "chunk_logits_bytes": 256 << 20},
}


def default_chunk_size(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk so the chunk's fp32 logits fit the architecture's budget (at least 16 rows)."""
    budget = LAUNCH_CONFIGS[arch_key(device)]["chunk_logits_bytes"]
    return max(16, min(n, budget // (4 * v)))


@triton.jit
def _ce_quail_rows(
    z_ptr,
    stride_z,
    t_ptr,
    ce_w_ptr,
    h_w_ptr,
    lse_ptr,
    zt_ptr,
    marg_ptr,
    zsum_ptr,
    V,
    margin,
    z_coef,
    label_smoothing,
    softcap,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
    CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + row * stride_z
    t = tl.load(t_ptr + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    first = tl.load(zrow + cols, mask=cols < V, other=float("-inf"))
    # running statistics, in the logits' dtype (fp32; fp64 only for gradient checks)
    m = tl.max(first, axis=0)
    s = tl.sum(tl.exp(first - m), axis=0)
    zt = tl.sum(tl.where(cols == t, first, 0.0), axis=0)
    zsum = tl.sum(tl.where(cols < V, first, 0.0), axis=0)
    other = tl.where(cols == t, float("-inf"), tl.where(cols < V, first, float("-inf")))
    best = tl.max(other, axis=0)
    best_idx = tl.argmax(other, axis=0, tie_break_left=True).to(tl.int32)
    for start in range(BLOCK_V, V, BLOCK_V):
        offs = start + cols
        z = tl.load(zrow + offs, mask=offs < V, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
        zt += tl.sum(tl.where(offs == t, z, 0.0), axis=0)
        zsum += tl.sum(tl.where(offs < V, z, 0.0), axis=0)
        other = tl.where(offs == t, float("-inf"), z)
        bmax = tl.max(other, axis=0)
        bidx = start + tl.argmax(other, axis=0, tie_break_left=True).to(tl.int32)
        better = bmax > best  # strictly: an equal later maximum keeps the first index
        best_idx = tl.where(better, bidx, best_idx)
        best = tl.where(better, bmax, best)
    lse = m + tl.log(s)
    marg = zt - best
    tl.store(lse_ptr + row, lse)
    tl.store(zt_ptr + row, zt)
    tl.store(marg_ptr + row, marg)
    if SMOOTH:
        tl.store(zsum_ptr + row, zsum)
    if WRITE_GRAD:
        ce_w = tl.load(ce_w_ptr + row)  # row's CE weight: 1/n_ce (mean), 1 (sum/none), 0 when ignored
        h_w = tl.load(h_w_ptr + row)  # row's hinge weight: lambda_q (/ n_hinge), 0 when not watched
        row_scale = ce_w * (1.0 + 2.0 * z_coef * lse)
        push = tl.where(marg < margin, h_w, 0.0)
        t_grad = ce_w * (1.0 - label_smoothing) + push
        smooth = ce_w * label_smoothing / V
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inside = offs < V
            z = tl.load(zrow + offs, mask=inside, other=0.0)
            g = tl.exp(z - lse) * row_scale
            if SMOOTH:
                g -= smooth
            g -= tl.where(offs == t, t_grad, 0.0)
            g += tl.where(offs == best_idx, push, 0.0)
            if CAP:  # z holds softcap * tanh(raw / softcap): d/draw = 1 - tanh^2
                r = z / softcap
                g *= 1.0 - r * r
            tl.store(zrow + offs, g, mask=inside)


def loss_and_grads(
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
    """Same contract as felix.ops.reference.loss.chunked_loss_and_grads, with the row work in Triton.
    Returns (parts [loss, ce, hinge, z_loss, active count, mean margin], dh, dW, db, rows [4, N])."""
    n, v = h.shape[0], weight.shape[0]
    cfg = LAUNCH_CONFIGS[arch_key(h.device)]
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid, safe_t, watched, ce_w, h_w, inv_n_ce, inv_n_h = row_weights(
        targets, whitelist, ignore_index, reduction, lambda_q, dt, row_weight
    )
    t32 = safe_t.to(torch.int32)
    acc = dt if dt == torch.float64 else accum_dtype
    dh = torch.empty_like(h) if need_grads else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grads else h.new_empty(0)
    db = torch.zeros(v, dtype=acc, device=h.device) if (need_grads and bias is not None) else h.new_empty(0)
    lse, zt, marg, zsum = (torch.zeros(n, dtype=dt, device=h.device) for _ in range(4))
    w_dt = logits_weight(h, weight, dt)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        hc = h[s:e]
        z = chunk_logits(hc, weight, w_dt, bias, dt)
        if softcap:
            z.div_(softcap).tanh_().mul_(softcap)
        _ce_quail_rows[(e - s,)](
            z,
            z.stride(0),
            t32[s:e],
            ce_w[s:e],
            h_w[s:e],
            lse[s:e],
            zt[s:e],
            marg[s:e],
            zsum[s:e],
            v,
            float(margin),
            float(z_loss),
            float(label_smoothing),
            float(softcap or 1.0),
            BLOCK_V=cfg["BLOCK_V"],
            WRITE_GRAD=need_grads,
            SMOOTH=bool(label_smoothing),
            CAP=bool(softcap),
            num_warps=cfg["num_warps"],
        )
        if need_grads:  # z now holds dL/dz (of the raw logits) for the chunk
            g = z.to(h.dtype)
            dh[s:e] = g @ weight
            dw += (g.t() @ hc).to(acc)
            if bias is not None:
                db += z.sum(0).to(acc)
    parts, rows = finish_parts(
        lse, zt, marg, zsum / v, valid, watched, inv_n_ce, inv_n_h, margin, lambda_q, z_loss, reduction, label_smoothing
    )
    return (parts, dh, dw.to(weight.dtype) if need_grads else dw, db.to(bias.dtype) if db.numel() else db, rows)


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """The row kernel (statistics only, and statistics + gradient), fp32 logits, as launched on `arch`."""
    cfg = LAUNCH_CONFIGS[arch]
    sig = {
        "z_ptr": "*fp32",
        "stride_z": "i32",
        "t_ptr": "*i32",
        "ce_w_ptr": "*fp32",
        "h_w_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "zt_ptr": "*fp32",
        "marg_ptr": "*fp32",
        "zsum_ptr": "*fp32",
        "V": "i32",
        "margin": "fp32",
        "z_coef": "fp32",
        "label_smoothing": "fp32",
        "softcap": "fp32",
        "BLOCK_V": "constexpr",
        "WRITE_GRAD": "constexpr",
        "SMOOTH": "constexpr",
        "CAP": "constexpr",
    }
    variants = [(False, False, False), (True, False, False), (True, True, True)]  # stats; grad; grad + options
    return [
        {
            "name": f"ce_quail_rows{'_grad' if grad else ''}{'_smooth_cap' if smooth else ''}",
            "fn": _ce_quail_rows,
            "signature": sig,
            "constexprs": {"BLOCK_V": cfg["BLOCK_V"], "WRITE_GRAD": grad, "SMOOTH": smooth, "CAP": cap},
            "options": {"num_warps": cfg["num_warps"]},
            "aligned": ["z_ptr"],
        }
        for grad, smooth, cap in variants
    ]
