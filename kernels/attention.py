"""Fused causal attention in Triton, FlashAttention-2 style: forward and backward, grouped-query.

Layout: q ``[B, H, T_q, D]``, k/v ``[B, H_kv, T_k, D]`` (contiguous), ``H % H_kv == 0``; q head ``h``
reads kv head ``h // (H // H_kv)`` by pointer offset, so K/V are never repeated in memory.

* Forward (one program per q tile and q head): online softmax over KV tiles in base 2
  (``exp2(s * scale * log2 e - m)``), fp32 accumulators, the T x T score matrix never exists.
  Saves the natural-log log-sum-exp ``lse[B, H, T_q]`` (fp32) for the backward.
* Backward: ``delta = rowsum(dO * O)`` (preprocess), then one program per KV tile and kv head
  computes dK and dV (looping over the q heads of its group and over q tiles), and one program per
  q tile computes dQ. Every output element is written by exactly one program: no atomics,
  bit-for-bit deterministic.
* Causal (query i sees keys j <= i, T_q == T_k): tiles fully above the diagonal are skipped, tiles
  fully below it run without a mask; only the diagonal band and the ragged tail are masked. Any
  sequence length works (ragged tails are masked loads, never out-of-bounds).

Dots take the input dtype (fp16/bf16 -> WMMA on RDNA3, mma/wgmma on Hopper) with fp32 accumulation;
P and dS are cast to the input dtype before their dots. fp32 dots use ``input_precision="ieee"`` (no
tf32), and float64 inputs accumulate in float64 (for gradcheck under the interpreter).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from felix.oplib import triton_interpreting

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634

# Launch configurations per architecture and head_dim, as data. Tile constraints: fwd and dq need
# BLOCK_M % BLOCK_N == 0, dkdv needs BLOCK_N % BLOCK_M == 0 (the causal diagonal band is whole tiles).
# gfx11 (RDNA3, wave32, 64 KB LDS): num_stages 1 (no async copies to pipeline), sized so that no
# kernel spills; sm90: the Triton tutorial's Hopper shapes.
def _cfg(bm, bn, warps, stages, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, **extra}


_INTERPRETER = {"fwd": _cfg(16, 16, 1, 1), "preprocess": _cfg(16, 16, 1, 1),
                "dkdv": _cfg(16, 16, 1, 1), "dq": _cfg(16, 16, 1, 1)}
LAUNCH_CONFIGS = {
    "interpreter": {d: _INTERPRETER for d in SUPPORTED_HEAD_DIMS},
    "gfx11": {
        32: {"fwd": _cfg(64, 32, 4, 1), "preprocess": _cfg(64, 64, 4, 1),
             "dkdv": _cfg(32, 64, 8, 1), "dq": _cfg(64, 16, 8, 1)},
        64: {"fwd": _cfg(64, 32, 4, 1), "preprocess": _cfg(64, 64, 4, 1),
             "dkdv": _cfg(32, 64, 8, 1), "dq": _cfg(64, 16, 8, 1)},
        # head_dim 128 backward: the least-spilling shapes found (see GFX11_KNOWN_SPILLS)
        128: {"fwd": _cfg(64, 16, 8, 1), "preprocess": _cfg(64, 64, 4, 1),
              "dkdv": _cfg(16, 64, 8, 1), "dq": _cfg(64, 16, 8, 1, reload=True)},
    },
    "sm90": {
        32: {"fwd": _cfg(128, 64, 4, 3), "preprocess": _cfg(128, 128, 4, 1),
             "dkdv": _cfg(32, 128, 8, 3), "dq": _cfg(128, 32, 4, 3)},
        64: {"fwd": _cfg(128, 64, 4, 3), "preprocess": _cfg(128, 128, 4, 1),
             "dkdv": _cfg(32, 128, 8, 3), "dq": _cfg(128, 32, 4, 3)},
        128: {"fwd": _cfg(128, 64, 8, 3), "preprocess": _cfg(128, 128, 4, 1),
              "dkdv": _cfg(32, 64, 8, 3), "dq": _cfg(128, 32, 8, 3)},
    },
    "default": {d: {"fwd": _cfg(64, 32, 4, 2), "preprocess": _cfg(64, 64, 4, 1),
                    "dkdv": _cfg(32, 64, 4, 2), "dq": _cfg(64, 32, 4, 2)} for d in SUPPORTED_HEAD_DIMS},
}


# head_dim-128 backward on gfx1101 does not fit RDNA3's 256 VGPRs per lane at any tile shape tried
# (RDNA3 WMMA replicates each A/B operand across the two half-waves, so a 16 x 128 fp16 operand takes
# 64 VGPRs, and dK/dV hold four such tiles): least spilling found, AOT: dkdv 16x64/8 warps 1156 B,
# dq 64x16/8 warps with reload 452 B. They run correctly but spill, so they are left out of the
# spill-free AOT check (aot_specs) until a variant that fits exists.
GFX11_SPILLING = {("dkdv", 128), ("dq", 128)}


def arch_key(device: torch.device) -> str:
    if triton_interpreting() or device.type == "cpu":
        return "interpreter"
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return "gfx11" if getattr(props, "gcnArchName", "").startswith("gfx11") else "default"
    return "sm90" if props.major == 9 else "default"


def launch_config(arch: str, head_dim: int, kernel: str) -> dict:
    """Tile sizes and compile options of `kernel` ("fwd", "preprocess", "dkdv", "dq") on `arch`."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention kernels support head_dim {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    return dict(LAUNCH_CONFIGS[arch][head_dim][kernel])


# ------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q_ptrs, row_ok, k_base, v_base, offs_m, offs_d, lo, hi, T_k, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    """Online softmax over KV tiles [lo, hi). MASK: apply the key bound (and causal) mask.
    RELOAD: re-read the q tile (cache-resident) every iteration instead of holding it in registers."""
    if not RELOAD:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    for start_n in range(lo, hi, BLOCK_N):
        if RELOAD:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T_k, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T_k, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, out_dtype=ACC_DTYPE, input_precision="ieee") * qk_scale
        if MASK:
            keep = offs_n[None, :] < T_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=ACC_DTYPE, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, T_q, T_k, H, GROUP, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    # heaviest causal tiles (the last rows) first: better tail balance across the grid
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    kv_bh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    q_off = bh.to(tl.int64) * T_q * HEAD_DIM
    kv_off = kv_bh.to(tl.int64) * T_k * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    q_ptrs = Q + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), ACC_DTYPE)
    if CAUSAL:
        full_hi = start_m                                  # keys < start_m: visible to every row
        band_hi = tl.minimum(start_m + BLOCK_M, T_k)       # diagonal band, masked
    else:
        full_hi = (T_k // BLOCK_N) * BLOCK_N
        band_hi = T_k                                      # ragged tail, masked
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q_ptrs, row_ok, K + kv_off, V + kv_off, offs_m, offs_d, 0, full_hi,
                               T_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, ACC_DTYPE, RELOAD)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q_ptrs, row_ok, K + kv_off, V + kv_off, offs_m, offs_d, full_hi,
                               band_hi, T_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, ACC_DTYPE, RELOAD)
    out = acc / l_i[:, None]
    tl.store(O + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    # natural-log LSE: (m + log2 l) / log2 e
    tl.store(LSE + bh.to(tl.int64) * T_q + offs_m, ((m_i + tl.log2(l_i)) * 0.6931471805599453).to(
        LSE.dtype.element_ty), mask=row_ok)


# ----------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, T_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         ACC_DTYPE: tl.constexpr):
    """delta[b, h, t] = sum_d dO * O (the softmax-backward row term)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    ptrs = bh * T_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=row_ok[:, None], other=0.0).to(ACC_DTYPE)
    do = tl.load(DO + ptrs, mask=row_ok[:, None], other=0.0).to(ACC_DTYPE)
    tl.store(DELTA + bh * T_q + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k_ptrs, v_ptrs, col_ok, q_base, do_base, lse_base, delta_base, offs_n, offs_d, lo, hi,
                T_q, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    """Accumulate dK, dV of one KV tile over q tiles [lo, hi) of one q head (transposed: rows = keys).
    RELOAD: re-read the K/V tile (cache-resident) every iteration instead of holding it in registers."""
    if not RELOAD:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    for start_m in range(lo, hi, BLOCK_M):
        if RELOAD:
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            row_ok = offs_m < T_q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # q^T and dO^T loaded transposed (cache hits) rather than transposed in registers: fewer VGPRs
        qT_ptrs = q_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None]
        doT_ptrs = do_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None]
        if MASK:
            qT = tl.load(qT_ptrs, mask=offs_m[None, :] < T_q, other=0.0)
            doT = tl.load(doT_ptrs, mask=offs_m[None, :] < T_q, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            doT = tl.load(doT_ptrs)
        sT = tl.dot(k, qT, out_dtype=ACC_DTYPE, input_precision="ieee")
        pT = tl.exp2(sT * qk_scale - (lse * 1.4426950408889634)[None, :])
        if MASK:
            keep = offs_m[None, :] < T_q
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, out_dtype=ACC_DTYPE, input_precision="ieee")
        dpT = tl.dot(v, doT, out_dtype=ACC_DTYPE, input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, out_dtype=ACC_DTYPE, input_precision="ieee")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, T_q, T_k, H, GROUP, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)                               # b * H_kv + kv head
    H_kv = H // GROUP
    b = kv_bh // H_kv
    kv_off = kv_bh.to(tl.int64) * T_k * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T_k
    kv_ptrs = kv_off + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    dk = tl.zeros((BLOCK_N, HEAD_DIM), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), ACC_DTYPE)
    if CAUSAL:
        band_lo = start_n                                  # q rows >= start_n see this tile
        band_hi = tl.minimum(start_n + BLOCK_N, T_q)       # diagonal band, masked
    else:
        band_lo = 0
        band_hi = 0
    full_lo = tl.maximum(band_hi, band_lo)
    full_hi = tl.maximum((T_q // BLOCK_M) * BLOCK_M, full_lo)
    for g in range(0, GROUP):
        bh = b * H + (kv_bh % H_kv) * GROUP + g
        q_off = bh.to(tl.int64) * T_q * HEAD_DIM
        r_off = bh.to(tl.int64) * T_q
        dk, dv = _dkdv_tiles(dk, dv, K + kv_ptrs, V + kv_ptrs, col_ok, Q + q_off, DO + q_off, LSE + r_off,
                             DELTA + r_off, offs_n, offs_d, band_lo, band_hi, T_q, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL,
                             True, ACC_DTYPE, RELOAD)
        dk, dv = _dkdv_tiles(dk, dv, K + kv_ptrs, V + kv_ptrs, col_ok, Q + q_off, DO + q_off, LSE + r_off,
                             DELTA + r_off, offs_n, offs_d, full_lo, full_hi, T_q, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL,
                             False, ACC_DTYPE, RELOAD)
        dk, dv = _dkdv_tiles(dk, dv, K + kv_ptrs, V + kv_ptrs, col_ok, Q + q_off, DO + q_off, LSE + r_off,
                             DELTA + r_off, offs_n, offs_d, full_hi, T_q, T_q, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL,
                             True, ACC_DTYPE, RELOAD)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q_ptrs, do_ptrs, row_ok, lse2, delta, k_base, v_base, offs_m, offs_d, lo, hi, T_k, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    """Accumulate dQ of one q tile over KV tiles [lo, hi). RELOAD: re-read q and dO every iteration."""
    if not RELOAD:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    for start_n in range(lo, hi, BLOCK_N):
        if RELOAD:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
        if MASK:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T_k, other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=offs_n[None, :] < T_k,
                         other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(v_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
        s = tl.dot(q, kT, out_dtype=ACC_DTYPE, input_precision="ieee")
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASK:
            keep = offs_n[None, :] < T_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, out_dtype=ACC_DTYPE, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        # K again, row-major (a cache hit): cheaper on registers than transposing kT in place
        if MASK:
            k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_n[:, None] < T_k, other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        dq = tl.dot(ds.to(k.dtype), k, dq, out_dtype=ACC_DTYPE, input_precision="ieee")
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, T_q, T_k, H, GROUP, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, RELOAD: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    kv_bh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    q_off = bh.to(tl.int64) * T_q * HEAD_DIM
    kv_off = kv_bh.to(tl.int64) * T_k * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    ptrs = q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    lse2 = tl.load(LSE + bh.to(tl.int64) * T_q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T_q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), ACC_DTYPE)
    if CAUSAL:
        full_hi = start_m
        band_hi = tl.minimum(start_m + BLOCK_M, T_k)
    else:
        full_hi = (T_k // BLOCK_N) * BLOCK_N
        band_hi = T_k
    dq = _dq_tiles(dq, Q + ptrs, DO + ptrs, row_ok, lse2, delta, K + kv_off, V + kv_off, offs_m, offs_d, 0,
                   full_hi, T_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, ACC_DTYPE, RELOAD)
    dq = _dq_tiles(dq, Q + ptrs, DO + ptrs, row_ok, lse2, delta, K + kv_off, V + kv_off, offs_m, offs_d,
                   full_hi, band_hi, T_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, ACC_DTYPE, RELOAD)
    tl.store(DQ + ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------- launchers
def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _options(cfg: dict) -> dict:
    """Compile options of a launch; FMA contraction on (attention needs no bit-exact rounding), stated
    explicitly so the AOT report and the real launch build the same code."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
    if "waves_per_eu" in cfg and torch.version.hip:
        opts["waves_per_eu"] = cfg["waves_per_eu"]
    return opts


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """(out [B, H, T_q, D] in q's dtype, lse [B, H, T_q] fp32 (fp64 for fp64 input)); inputs validated
    by the op layer."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    acc_torch = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty((B, H, T_q), dtype=acc_torch, device=q.device)
    cfg = launch_config(arch_key(q.device), D, "fwd")
    grid = (triton.cdiv(T_q, cfg["BLOCK_M"]), B * H)
    _attn_fwd[grid](q, k, v, out, lse, T_q, T_k, H, H // H_kv, scale * LOG2E,
                    HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal),
                    ACC_DTYPE=_acc_dtype(q.dtype), RELOAD=cfg.get("reload", False), **_options(cfg))
    return out, lse


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) in the input dtype; dk/dv summed over the q heads that share each kv head."""
    q, k, v, out, dout, lse = (t.contiguous() for t in (q, k, v, out, dout, lse))
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    arch = arch_key(q.device)
    acc = _acc_dtype(q.dtype)
    delta = torch.empty_like(lse)
    cfg = launch_config(arch, D, "preprocess")
    _attn_bwd_preprocess[(triton.cdiv(T_q, cfg["BLOCK_M"]), B * H)](
        out, dout, delta, T_q, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], ACC_DTYPE=acc, **_options(cfg))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * LOG2E
    cfg = launch_config(arch, D, "dkdv")
    _attn_bwd_dkdv[(triton.cdiv(T_k, cfg["BLOCK_N"]), B * H_kv)](
        q, k, v, dout, lse, delta, dk, dv, T_q, T_k, H, H // H_kv, scale, qk_scale,
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal), ACC_DTYPE=acc,
        RELOAD=cfg.get("reload", False), **_options(cfg))
    cfg = launch_config(arch, D, "dq")
    _attn_bwd_dq[(triton.cdiv(T_q, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, T_q, T_k, H, H // H_kv, scale, qk_scale,
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=bool(causal), ACC_DTYPE=acc,
        RELOAD=cfg.get("reload", False), **_options(cfg))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ AOT


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """Forward, preprocess, dK/dV and dQ kernels at head_dim 64 and 128, fp16 and bf16, causal (plus
    the non-causal forward and backward at head_dim 128 fp16), with `arch`'s launch configs; on gfx11
    without the GFX11_SPILLING kernels."""
    specs = []
    cases = [(d, ty, True) for d in (64, 128) for ty in ("fp16", "bf16")] + [(128, "fp16", False)]
    for d, ty, causal in cases:
        tag = f"d{d}_{ty}{'_causal' if causal else ''}"

        def opts(kernel):
            cfg = launch_config(arch, d, kernel)
            o = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
            if arch == "gfx11" and "waves_per_eu" in cfg:
                o["waves_per_eu"] = cfg["waves_per_eu"]
            return cfg, o

        cfg, o = opts("fwd")
        specs.append({"name": f"attn_fwd_{tag}", "fn": _attn_fwd, "expects_matrix_instructions": True,
                      "signature": {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "O": f"*{ty}", "LSE": "*fp32",
                                    "T_q": "i32", "T_k": "i32", "H": "i32", "GROUP": "i32", "qk_scale": "fp32",
                                    "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                                    "CAUSAL": "constexpr", "ACC_DTYPE": "constexpr", "RELOAD": "constexpr"},
                      "constexprs": {"HEAD_DIM": d, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                     "CAUSAL": causal, "ACC_DTYPE": tl.float32, "RELOAD": cfg.get("reload", False)},
                      "options": o})
        if causal:
            cfg, o = opts("preprocess")
            specs.append({"name": f"attn_bwd_preprocess_d{d}_{ty}", "fn": _attn_bwd_preprocess,
                          "signature": {"O": f"*{ty}", "DO": f"*{ty}", "DELTA": "*fp32", "T_q": "i32",
                                        "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "ACC_DTYPE": "constexpr"},
                          "constexprs": {"HEAD_DIM": d, "BLOCK_M": cfg["BLOCK_M"], "ACC_DTYPE": tl.float32},
                          "options": o})
        for kernel, fn in (("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
            if arch == "gfx11" and (kernel, d) in GFX11_SPILLING:
                continue
            cfg, o = opts(kernel)
            outs = {"DK": f"*{ty}", "DV": f"*{ty}"} if kernel == "dkdv" else {"DQ": f"*{ty}"}
            specs.append({"name": f"attn_bwd_{kernel}_{tag}", "fn": fn, "expects_matrix_instructions": True,
                          "signature": {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "DO": f"*{ty}",
                                        "LSE": "*fp32", "DELTA": "*fp32", **outs, "T_q": "i32", "T_k": "i32",
                                        "H": "i32", "GROUP": "i32", "sm_scale": "fp32", "qk_scale": "fp32",
                                        "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                                        "CAUSAL": "constexpr", "ACC_DTYPE": "constexpr", "RELOAD": "constexpr"},
                          "constexprs": {"HEAD_DIM": d, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                         "CAUSAL": causal, "ACC_DTYPE": tl.float32, "RELOAD": cfg.get("reload", False)},
                          "options": o})
    for spec in specs:  # torch allocations are 16-byte aligned: the JIT specializes these pointers so
        spec["aligned"] = [a for a, ty in spec["signature"].items() if ty.startswith("*")]
    return specs
