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
The normalisers (numbers of scored and of whitelisted positions) are device tensors read by the kernel:
no host synchronisation anywhere in the loop.

Launch configuration (vocabulary tile, warps, logits budget per chunk) is data, per architecture.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.oplib import arch_key, triton_interpreting  # noqa: F401  (arch_key: one rule for every kernel family)
from felix.reference.loss import chunk_logits, logits_weight, normalisers

# BLOCK_V: vocabulary elements per step of a row's sweep; chunk_logits_bytes: the fp32 logits of one
# chunk (rows x V x 4 bytes) that the default chunk size keeps to (the only N x V-shaped buffer).
LAUNCH_CONFIGS = {
    "interpreter": {"BLOCK_V": 64, "num_warps": 1, "chunk_logits_bytes": 1 << 20},
    "gfx11": {"BLOCK_V": 1024, "num_warps": 4, "chunk_logits_bytes": 256 << 20},   # RX 7800 XT: 16 GB
    "sm90": {"BLOCK_V": 2048, "num_warps": 8, "chunk_logits_bytes": 1 << 30},      # H100: 80 GB
    "default": {"BLOCK_V": 1024, "num_warps": 4, "chunk_logits_bytes": 256 << 20},
}


def default_chunk_size(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk so the chunk's fp32 logits fit the architecture's budget (at least 16 rows)."""
    budget = LAUNCH_CONFIGS[arch_key(device)]["chunk_logits_bytes"]
    return max(16, min(n, budget // (4 * v)))


@triton.jit
def _ce_quail_rows(z_ptr, stride_z, t_ptr, valid_ptr, watched_ptr, inv_n_ce_ptr, inv_n_h_ptr,
                   lse_ptr, zt_ptr, marg_ptr, V, margin, lambda_q, z_coef,
                   BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + row * stride_z
    t = tl.load(t_ptr + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    first = tl.load(zrow + cols, mask=cols < V, other=float("-inf"))
    # running statistics, in the logits' dtype (fp32; fp64 only for gradient checks)
    m = tl.max(first, axis=0)
    s = tl.sum(tl.exp(first - m), axis=0)
    zt = tl.sum(tl.where(cols == t, first, 0.0), axis=0)
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
    if WRITE_GRAD:
        valid = tl.load(valid_ptr + row) != 0
        watched = tl.load(watched_ptr + row) != 0
        inv_n_ce = tl.load(inv_n_ce_ptr)
        inv_n_h = tl.load(inv_n_h_ptr)
        row_scale = tl.where(valid, inv_n_ce * (1.0 + 2.0 * z_coef * lse), 0.0)
        t_grad = tl.where(valid, inv_n_ce, 0.0)
        push = tl.where(watched & (marg < margin), lambda_q * inv_n_h, 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inside = offs < V
            z = tl.load(zrow + offs, mask=inside, other=0.0)
            g = tl.exp(z - lse) * row_scale
            g -= tl.where(offs == t, t_grad + push, 0.0)
            g += tl.where(offs == best_idx, push, 0.0)
            tl.store(zrow + offs, g, mask=inside)


def loss_and_grads(h, weight, targets, whitelist, bias, margin, lambda_q, z_loss, ignore_index, chunk_size,
                   accum_dtype=torch.float32, need_grads=True):
    """Same contract as felix.reference.loss.chunked_loss_and_grads, with the row work in Triton.
    Returns (parts [loss, ce, hinge, z_loss, active count, mean margin], dh, dW, db)."""
    n, v = h.shape[0], weight.shape[0]
    cfg = LAUNCH_CONFIGS[arch_key(h.device)]
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid, safe_t, watched, inv_n_ce, inv_n_h = normalisers(targets, whitelist, ignore_index, dt)
    valid8, watched8, t32 = valid.to(torch.int8), watched.to(torch.int8), safe_t.to(torch.int32)
    acc = dt if dt == torch.float64 else accum_dtype
    dh = torch.empty_like(h) if need_grads else h.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grads else h.new_empty(0)
    db = torch.zeros(v, dtype=acc, device=h.device) if (need_grads and bias is not None) else h.new_empty(0)
    lse, zt, marg = (torch.empty(n, dtype=dt, device=h.device) for _ in range(3))
    w_dt = logits_weight(h, weight, dt)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        hc = h[s:e]
        z = chunk_logits(hc, weight, w_dt, bias, dt)
        _ce_quail_rows[(e - s,)](z, z.stride(0), t32[s:e], valid8[s:e], watched8[s:e], inv_n_ce, inv_n_h,
                                 lse[s:e], zt[s:e], marg[s:e], v, float(margin), float(lambda_q), float(z_loss),
                                 BLOCK_V=cfg["BLOCK_V"], WRITE_GRAD=need_grads, num_warps=cfg["num_warps"])
        if need_grads:  # z now holds dL/dz for the chunk
            g = z.to(h.dtype)
            dh[s:e] = g @ weight
            dw += (g.t() @ hc).to(acc)
            if bias is not None:
                db += z.sum(0).to(acc)
    ce = torch.where(valid, lse - zt, 0).sum() * inv_n_ce
    hinge = torch.where(watched, torch.relu(margin - marg), 0).sum() * inv_n_h
    zl = z_loss * torch.where(valid, lse * lse, 0).sum() * inv_n_ce
    active = (watched & (marg < margin)).sum().to(dt)
    mean_margin = torch.where(watched, marg, 0).sum() * inv_n_h
    parts = torch.stack([ce + lambda_q * hinge + zl, ce, hinge, zl, active, mean_margin])
    return parts, dh, dw.to(weight.dtype) if need_grads else dw, db.to(bias.dtype) if db.numel() else db


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """The row kernel (statistics only, and statistics + gradient), fp32 logits, as launched on `arch`."""
    cfg = LAUNCH_CONFIGS[arch]
    sig = {"z_ptr": "*fp32", "stride_z": "i32", "t_ptr": "*i32", "valid_ptr": "*i8", "watched_ptr": "*i8",
           "inv_n_ce_ptr": "*fp32", "inv_n_h_ptr": "*fp32", "lse_ptr": "*fp32", "zt_ptr": "*fp32",
           "marg_ptr": "*fp32", "V": "i32", "margin": "fp32", "lambda_q": "fp32", "z_coef": "fp32",
           "BLOCK_V": "constexpr", "WRITE_GRAD": "constexpr"}
    return [{"name": f"ce_quail_rows{'_grad' if grad else ''}", "fn": _ce_quail_rows, "signature": sig,
             "constexprs": {"BLOCK_V": cfg["BLOCK_V"], "WRITE_GRAD": grad},
             "options": {"num_warps": cfg["num_warps"]}, "aligned": ["z_ptr"]}
            for grad in (False, True)]
