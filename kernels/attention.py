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
tf32), and float64 inputs accumulate in float64 (for gradcheck under the interpreter). On
register-starved targets (RDNA3) the backward can stream head_dim slices of its operands (STREAM).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from felix.ops.dispatch import arch_key
from felix.ops.reference.attention import SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634


# Launch configurations per architecture and head_dim, as data. Tile constraints: fwd and dq need
# BLOCK_M % BLOCK_N == 0, dkdv needs BLOCK_N % BLOCK_M == 0 (the causal diagonal band is whole tiles).
# Optional keys: "stream" (backward kernels: contract head_dim in slices of this width, loaded just in
# time, instead of holding whole K/V or q/dO tiles in registers), "waves_per_eu" (AMD compile option).
# gfx11 (RDNA3, wave32, 64 KB LDS): num_stages 1. RDNA3 WMMA replicates each A/B operand across the
# two half-waves, so a resident 16 x 128 fp16 operand costs 64 VGPRs of the 256: the backward streams
# 32-wide slices (without it head_dim 128 spilled at every shape tried; with it nothing spills and
# occupancy rises). waves_per_eu 1 or 2 gave no occupancy gain in the AOT report, so none is set.
# sm90: the Triton tutorial's Hopper shapes, adjusted until ptxas reports no spills.
def _cfg(bm, bn, warps, stages, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, **extra}


_INTERPRETER = {
    "fwd": _cfg(16, 16, 1, 1),
    "preprocess": _cfg(16, 16, 1, 1),
    "dkdv": _cfg(16, 16, 1, 1),
    "dq": _cfg(16, 16, 1, 1),
}
LAUNCH_CONFIGS = {
    "interpreter": {d: _INTERPRETER for d in SUPPORTED_HEAD_DIMS},
    "gfx11": {
        32: {
            "fwd": _cfg(64, 32, 4, 1),
            "preprocess": _cfg(64, 64, 4, 1),
            "dkdv": _cfg(32, 64, 8, 1, stream=32),
            "dq": _cfg(64, 32, 8, 1, stream=32),
        },
        64: {
            "fwd": _cfg(64, 32, 4, 1),
            "preprocess": _cfg(64, 64, 4, 1),
            "dkdv": _cfg(32, 64, 8, 1, stream=32),
            "dq": _cfg(64, 32, 8, 1, stream=32),
        },
        128: {
            "fwd": _cfg(64, 16, 8, 1),
            "preprocess": _cfg(64, 64, 4, 1),
            "dkdv": _cfg(32, 64, 8, 1, stream=32),
            "dq": _cfg(64, 32, 8, 1, stream=32),
        },
    },
    "sm90": {
        32: {
            "fwd": _cfg(128, 64, 4, 3),
            "preprocess": _cfg(128, 128, 4, 1),
            "dkdv": _cfg(32, 128, 8, 3),
            "dq": _cfg(128, 32, 4, 3),
        },
        64: {
            "fwd": _cfg(128, 64, 4, 3),
            "preprocess": _cfg(128, 128, 4, 1),
            "dkdv": _cfg(32, 128, 8, 3),
            "dq": _cfg(128, 32, 4, 3),
        },
        128: {
            "fwd": _cfg(128, 64, 8, 3),
            "preprocess": _cfg(128, 128, 4, 1),
            "dkdv": _cfg(32, 64, 8, 2),
            "dq": _cfg(128, 32, 8, 3),
        },
    },
    "default": {
        d: {
            "fwd": _cfg(64, 32, 4, 2),
            "preprocess": _cfg(64, 64, 4, 1),
            "dkdv": _cfg(32, 64, 4, 2),
            "dq": _cfg(64, 32, 4, 2),
        }
        for d in SUPPORTED_HEAD_DIMS
    },
}


def launch_config(arch: str, head_dim: int, kernel: str) -> dict:
    """Tile sizes and compile options of `kernel` ("fwd", "preprocess", "dkdv", "dq") on `arch`."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention kernels support head_dim {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    return dict(LAUNCH_CONFIGS[arch][head_dim][kernel])


# ------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q_ptrs,
    row_ok,
    k_base,
    v_base,
    offs_m,
    offs_d,
    lo,
    hi,
    T_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Online softmax over KV tiles [lo, hi). MASK: apply the key bound (and causal) mask."""
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    for start_n in range(lo, hi, BLOCK_N):
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
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    T_q,
    T_k,
    H,
    GROUP,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
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
        full_hi = start_m  # keys < start_m: visible to every row
        band_hi = tl.minimum(start_m + BLOCK_M, T_k)  # diagonal band, masked
    else:
        full_hi = (T_k // BLOCK_N) * BLOCK_N
        band_hi = T_k  # ragged tail, masked
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q_ptrs,
        row_ok,
        K + kv_off,
        V + kv_off,
        offs_m,
        offs_d,
        0,
        full_hi,
        T_k,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        CAUSAL,
        False,
        ACC_DTYPE,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q_ptrs,
        row_ok,
        K + kv_off,
        V + kv_off,
        offs_m,
        offs_d,
        full_hi,
        band_hi,
        T_k,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        CAUSAL,
        True,
        ACC_DTYPE,
    )
    out = acc / l_i[:, None]
    tl.store(O + q_off + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    # natural-log LSE: (m + log2 l) / log2 e
    tl.store(
        LSE + bh.to(tl.int64) * T_q + offs_m,
        ((m_i + tl.log2(l_i)) * 0.6931471805599453).to(LSE.dtype.element_ty),
        mask=row_ok,
    )


# ----------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, T_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr):
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
def _dkdv_tiles(
    dk,
    dv,
    k_base,
    v_base,
    col_ok,
    q_base,
    do_base,
    lse_base,
    delta_base,
    offs_n,
    offs_d,
    lo,
    hi,
    T_q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STREAM: tl.constexpr,
):
    """Accumulate dK, dV of one KV tile over q tiles [lo, hi) of one q head (transposed: rows = keys).
    STREAM > 0: S^T and dP^T contract over head_dim in STREAM-wide slices loaded just in time (K, V
    never whole in registers); 0: the K and V tiles stay in registers."""
    if STREAM == 0:
        k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T_q
        q_ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if STREAM > 0:
            # the K/V slices' mask depends on the loop (it is always true here): keeps the compiler from
            # hoisting them out of the loop, which would make K and V resident again
            kv_ok = col_ok & (tl.full(col_ok.shape, start_m, tl.int32) < T_q)
            sT = _dot_abT(
                k_base,
                offs_n,
                kv_ok,
                q_base,
                offs_m,
                row_ok,
                tl.zeros((BLOCK_N, BLOCK_M), ACC_DTYPE),
                HEAD_DIM,
                STREAM,
                ACC_DTYPE,
            )
        else:
            # q^T loaded transposed (a cache hit) rather than transposed in registers: fewer VGPRs
            qT_ptrs = q_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None]
            if MASK:
                qT = tl.load(qT_ptrs, mask=row_ok[None, :], other=0.0)
            else:
                qT = tl.load(qT_ptrs)
            sT = tl.dot(k, qT, out_dtype=ACC_DTYPE, input_precision="ieee")
        pT = tl.exp2(sT * qk_scale - (lse * 1.4426950408889634)[None, :])
        if MASK:
            keep = row_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, out_dtype=ACC_DTYPE, input_precision="ieee")
        if STREAM > 0:
            dpT = _dot_abT(
                v_base,
                offs_n,
                kv_ok,
                do_base,
                offs_m,
                row_ok,
                tl.zeros((BLOCK_N, BLOCK_M), ACC_DTYPE),
                HEAD_DIM,
                STREAM,
                ACC_DTYPE,
            )
        else:
            doT_ptrs = do_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None]
            if MASK:
                doT = tl.load(doT_ptrs, mask=row_ok[None, :], other=0.0)
            else:
                doT = tl.load(doT_ptrs)
            dpT = tl.dot(v, doT, out_dtype=ACC_DTYPE, input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, out_dtype=ACC_DTYPE, input_precision="ieee")
    return dk, dv


@triton.jit
def _dkdv_over_group(
    dk,
    dv,
    K,
    V,
    Q,
    DO,
    LSE,
    DELTA,
    col_ok,
    offs_n,
    offs_d,
    b,
    kv_head,
    H,
    GROUP,
    T_q,
    band_lo,
    band_hi,
    full_lo,
    full_hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STREAM: tl.constexpr,
):
    """dK/dV contributions of every q head sharing this kv head: the diagonal band (masked), the
    fully visible q tiles (unmasked), the ragged tail (masked)."""
    for g in range(0, GROUP):
        bh = b * H + kv_head * GROUP + g
        q_off = bh.to(tl.int64) * T_q * HEAD_DIM
        r_off = bh.to(tl.int64) * T_q
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            K,
            V,
            col_ok,
            Q + q_off,
            DO + q_off,
            LSE + r_off,
            DELTA + r_off,
            offs_n,
            offs_d,
            band_lo,
            band_hi,
            T_q,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            CAUSAL,
            True,
            ACC_DTYPE,
            STREAM,
        )
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            K,
            V,
            col_ok,
            Q + q_off,
            DO + q_off,
            LSE + r_off,
            DELTA + r_off,
            offs_n,
            offs_d,
            full_lo,
            full_hi,
            T_q,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            CAUSAL,
            False,
            ACC_DTYPE,
            STREAM,
        )
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            K,
            V,
            col_ok,
            Q + q_off,
            DO + q_off,
            LSE + r_off,
            DELTA + r_off,
            offs_n,
            offs_d,
            full_hi,
            T_q,
            T_q,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            CAUSAL,
            True,
            ACC_DTYPE,
            STREAM,
        )
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    T_q,
    T_k,
    H,
    GROUP,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STREAM: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)  # b * H_kv + kv head
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
        band_lo = start_n  # q rows >= start_n see this tile
        band_hi = tl.minimum(start_n + BLOCK_N, T_q)  # diagonal band, masked
    else:
        band_lo = 0
        band_hi = 0
    full_lo = tl.maximum(band_hi, band_lo)
    full_hi = tl.maximum((T_q // BLOCK_M) * BLOCK_M, full_lo)
    kv_head = kv_bh % H_kv
    dk, dv = _dkdv_over_group(
        dk,
        dv,
        K + kv_off,
        V + kv_off,
        Q,
        DO,
        LSE,
        DELTA,
        col_ok,
        offs_n,
        offs_d,
        b,
        kv_head,
        H,
        GROUP,
        T_q,
        band_lo,
        band_hi,
        full_lo,
        full_hi,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        CAUSAL,
        ACC_DTYPE,
        STREAM,
    )
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dot_abT(
    a_base,
    a_rows,
    a_ok,
    b_base,
    b_rows,
    b_ok,
    acc,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """acc + A @ B^T for A = a_base[a_rows, :], B = b_base[b_rows, :] (row-major, HEAD_DIM wide),
    contracted over head_dim in CHUNK-wide slices, each loaded (a cache hit) just before its dot:
    neither operand is ever whole in registers."""
    for c in tl.static_range(0, HEAD_DIM, CHUNK):
        offs_c = c + tl.arange(0, CHUNK)
        a = tl.load(a_base + a_rows[:, None] * HEAD_DIM + offs_c[None, :], mask=a_ok[:, None], other=0.0)
        bT = tl.load(b_base + b_rows[None, :] * HEAD_DIM + offs_c[:, None], mask=b_ok[None, :], other=0.0)
        acc = tl.dot(a, bT, acc, out_dtype=ACC_DTYPE, input_precision="ieee")
    return acc


@triton.jit
def _dq_tiles(
    dq,
    q_base,
    do_base,
    row_ok,
    lse2,
    delta,
    k_base,
    v_base,
    offs_m,
    offs_d,
    lo,
    hi,
    T_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STREAM: tl.constexpr,
):
    """Accumulate dQ of one q tile over KV tiles [lo, hi). STREAM > 0: q, dO, K^T, V^T are streamed in
    STREAM-wide head_dim slices (for register-starved targets); 0: q and dO stay in registers."""
    if STREAM == 0:
        q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_k
        if STREAM > 0:
            # the q/dO slices' mask depends on the loop (always true here): keeps the compiler from
            # hoisting them out of the loop, which would make q and dO resident again
            q_ok = row_ok & (tl.full(row_ok.shape, start_n, tl.int32) < T_k)
            s = _dot_abT(
                q_base,
                offs_m,
                q_ok,
                k_base,
                offs_n,
                col_ok,
                tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE),
                HEAD_DIM,
                STREAM,
                ACC_DTYPE,
            )
        else:
            kT_ptrs = k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
            if MASK:
                kT = tl.load(kT_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                kT = tl.load(kT_ptrs)
            s = tl.dot(q, kT, out_dtype=ACC_DTYPE, input_precision="ieee")
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASK:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        if STREAM > 0:
            dp = _dot_abT(
                do_base,
                offs_m,
                q_ok,
                v_base,
                offs_n,
                col_ok,
                tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE),
                HEAD_DIM,
                STREAM,
                ACC_DTYPE,
            )
        else:
            vT_ptrs = v_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
            if MASK:
                vT = tl.load(vT_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                vT = tl.load(vT_ptrs)
            dp = tl.dot(do, vT, out_dtype=ACC_DTYPE, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        # K again, row-major (a cache hit): cheaper on registers than transposing K^T in place
        k_ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        dq = tl.dot(ds.to(k.dtype), k, dq, out_dtype=ACC_DTYPE, input_precision="ieee")
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    T_q,
    T_k,
    H,
    GROUP,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    STREAM: tl.constexpr,
):
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
    dq = _dq_tiles(
        dq,
        Q + q_off,
        DO + q_off,
        row_ok,
        lse2,
        delta,
        K + kv_off,
        V + kv_off,
        offs_m,
        offs_d,
        0,
        full_hi,
        T_k,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        CAUSAL,
        False,
        ACC_DTYPE,
        STREAM,
    )
    dq = _dq_tiles(
        dq,
        Q + q_off,
        DO + q_off,
        row_ok,
        lse2,
        delta,
        K + kv_off,
        V + kv_off,
        offs_m,
        offs_d,
        full_hi,
        band_hi,
        T_k,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        CAUSAL,
        True,
        ACC_DTYPE,
        STREAM,
    )
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
    _attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        T_q,
        T_k,
        H,
        H // H_kv,
        scale * LOG2E,
        HEAD_DIM=D,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=bool(causal),
        ACC_DTYPE=_acc_dtype(q.dtype),
        **_options(cfg),
    )
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
        out, dout, delta, T_q, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], ACC_DTYPE=acc, **_options(cfg)
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * LOG2E
    cfg = launch_config(arch, D, "dkdv")
    _attn_bwd_dkdv[(triton.cdiv(T_k, cfg["BLOCK_N"]), B * H_kv)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        T_q,
        T_k,
        H,
        H // H_kv,
        scale,
        qk_scale,
        HEAD_DIM=D,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=bool(causal),
        ACC_DTYPE=acc,
        STREAM=cfg.get("stream", 0),
        **_options(cfg),
    )
    cfg = launch_config(arch, D, "dq")
    _attn_bwd_dq[(triton.cdiv(T_q, cfg["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        T_q,
        T_k,
        H,
        H // H_kv,
        scale,
        qk_scale,
        HEAD_DIM=D,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=bool(causal),
        ACC_DTYPE=acc,
        STREAM=cfg.get("stream", 0),
        **_options(cfg),
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ AOT


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """Forward, preprocess, dK/dV and dQ kernels at head_dim 64 and 128, fp16 and bf16, causal (plus
    the non-causal forward and backward at head_dim 128 fp16), with `arch`'s launch configs."""
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
        specs.append(
            {
                "name": f"attn_fwd_{tag}",
                "fn": _attn_fwd,
                "expects_matrix_instructions": True,
                "signature": {
                    "Q": f"*{ty}",
                    "K": f"*{ty}",
                    "V": f"*{ty}",
                    "O": f"*{ty}",
                    "LSE": "*fp32",
                    "T_q": "i32",
                    "T_k": "i32",
                    "H": "i32",
                    "GROUP": "i32",
                    "qk_scale": "fp32",
                    "HEAD_DIM": "constexpr",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                    "CAUSAL": "constexpr",
                    "ACC_DTYPE": "constexpr",
                },
                "constexprs": {
                    "HEAD_DIM": d,
                    "BLOCK_M": cfg["BLOCK_M"],
                    "BLOCK_N": cfg["BLOCK_N"],
                    "CAUSAL": causal,
                    "ACC_DTYPE": tl.float32,
                },
                "options": o,
            }
        )
        if causal:
            cfg, o = opts("preprocess")
            specs.append(
                {
                    "name": f"attn_bwd_preprocess_d{d}_{ty}",
                    "fn": _attn_bwd_preprocess,
                    "signature": {
                        "O": f"*{ty}",
                        "DO": f"*{ty}",
                        "DELTA": "*fp32",
                        "T_q": "i32",
                        "HEAD_DIM": "constexpr",
                        "BLOCK_M": "constexpr",
                        "ACC_DTYPE": "constexpr",
                    },
                    "constexprs": {"HEAD_DIM": d, "BLOCK_M": cfg["BLOCK_M"], "ACC_DTYPE": tl.float32},
                    "options": o,
                }
            )
        for kernel, fn in (("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
            cfg, o = opts(kernel)
            outs = {"DK": f"*{ty}", "DV": f"*{ty}"} if kernel == "dkdv" else {"DQ": f"*{ty}"}
            variant = {"STREAM": cfg.get("stream", 0)}
            specs.append(
                {
                    "name": f"attn_bwd_{kernel}_{tag}",
                    "fn": fn,
                    "expects_matrix_instructions": True,
                    "signature": {
                        "Q": f"*{ty}",
                        "K": f"*{ty}",
                        "V": f"*{ty}",
                        "DO": f"*{ty}",
                        "LSE": "*fp32",
                        "DELTA": "*fp32",
                        **outs,
                        "T_q": "i32",
                        "T_k": "i32",
                        "H": "i32",
                        "GROUP": "i32",
                        "sm_scale": "fp32",
                        "qk_scale": "fp32",
                        "HEAD_DIM": "constexpr",
                        "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr",
                        "CAUSAL": "constexpr",
                        "ACC_DTYPE": "constexpr",
                        **{k: "constexpr" for k in variant},
                    },
                    "constexprs": {
                        "HEAD_DIM": d,
                        "BLOCK_M": cfg["BLOCK_M"],
                        "BLOCK_N": cfg["BLOCK_N"],
                        "CAUSAL": causal,
                        "ACC_DTYPE": tl.float32,
                        **variant,
                    },
                    "options": o,
                }
            )
    for spec in specs:  # torch allocations are 16-byte aligned: the JIT specializes these pointers so
        spec["aligned"] = [a for a, ty in spec["signature"].items() if ty.startswith("*")]
    return specs
