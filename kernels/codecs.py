"""Triton block codecs: quantize float tensors to ggml blocks and decode them, byte-exact with
felix/ops/reference/codecs.py (itself byte-exact with ggml's C quantizers).

One program handles a tile of BLOCKS ggml blocks (rows masked for the ragged tail). Layouts, as in
felix/core/formats.py (block sizes, byte counts, scale / index offsets, packing and codebooks are read from there as
module-level Triton constexprs, never retyped; each kernel implements one packing and checks the table agrees):

* q8_0 ("int8"): x = d * q;  q4_0 ("halves"): x = d * (q - 8);  iq4_nl ("halves"): x = d * IQ4_NL_VALUES[q];
  rq4 ("pairs"): x = d * RQ4_CODEBOOK[q];  tq2_0 ("crumbs", scale after the indices): x = d * (q - 1)

Exactness on real GPUs: quantize kernels are launched with ``enable_fp_fusion=False`` (a fused
multiply-add would change ggml's rounding) and divide with ``tl.math.div_rn`` (IEEE division).
The IQ4_NL scale search sums its 32 products sequentially, in ggml's order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from felix.core.formats import FORMATS, get_format
from felix.ops.dispatch import arch_key

# The packing each kernel pair implements; the table must agree (a format whose packing changes needs new kernels).
KERNEL_PACKING = {"q8_0": "int8", "q4_0": "halves", "iq4_nl": "halves", "rq4": "pairs", "tq2_0": "crumbs"}
for _name, _packing in KERNEL_PACKING.items():
    if FORMATS[_name].packing != _packing:
        raise ImportError(
            f"kernels/codecs.py implements {_name} as {_packing!r} packing, the format table says "
            f"{FORMATS[_name].packing!r}"
        )


def _geometry(name: str):
    """(weights per block, bytes per block, scale offset, index offset) of `name` as Triton constexprs."""
    f = get_format(name)
    return tuple(tl.constexpr(v) for v in (f.block_size, f.bytes_per_block, f.scale_offset, f.qs_offset))


Q8_0_BLOCK, Q8_0_BYTES, Q8_0_SCALE, Q8_0_QS = _geometry("q8_0")
Q8_0_RANGE = tl.constexpr(FORMATS["q8_0"].range_divisor)
Q4_0_BLOCK, Q4_0_BYTES, Q4_0_SCALE, Q4_0_QS = _geometry("q4_0")
IQ4_NL_BLOCK, IQ4_NL_BYTES, IQ4_NL_SCALE, IQ4_NL_QS = _geometry("iq4_nl")
IQ4_NL_LEVELS = tl.constexpr(len(FORMATS["iq4_nl"].codebook))
RQ4_BLOCK, RQ4_BYTES, RQ4_SCALE, RQ4_QS = _geometry("rq4")
RQ4_LEVELS = tl.constexpr(len(FORMATS["rq4"].codebook))
TQ2_0_BLOCK, TQ2_0_BYTES, TQ2_0_SCALE, TQ2_0_QS = _geometry("tq2_0")
TQ2_0_QS_BYTES = tl.constexpr(FORMATS["tq2_0"].qs_bytes)
TQ2_0_STRIDE = tl.constexpr(FORMATS["tq2_0"].crumb_stride)  # bytes per group of 4 * stride weights
TQ2_0_BITS = tl.constexpr(FORMATS["tq2_0"].index_bits)
TQ2_0_LANES = tl.constexpr(8 // FORMATS["tq2_0"].index_bits)  # indices per byte
TQ2_0_MASK = tl.constexpr((1 << FORMATS["tq2_0"].index_bits) - 1)

# Launch configurations per architecture, as data: weights per program (a tile of whole blocks) and
# warps per program. 2048 weights over 128 lanes keeps every codec spill-free on gfx1101 (wave32).
LAUNCH_CONFIGS = {
    "interpreter": {"tile_weights": 256, "num_warps": 1},
    "gfx11": {"tile_weights": 2048, "num_warps": 4},  # RDNA3 (RX 7800 XT): wave32
    "sm90": {"tile_weights": 4096, "num_warps": 8},  # Hopper
    "default": {"tile_weights": 2048, "num_warps": 4},
}
# IQ4_NL's scale search is compute-bound (15 x 32 sequential steps): a quarter of the tile, spill-free.
TILE_DIVISOR = {"iq4_nl": 4}


# ------------------------------------------------------------------------------- helpers
@triton.jit
def _store_fp16_le(ptr, d, mask):
    """Store fp16(d) (round to nearest even) as two little-endian bytes at ptr, ptr + 1."""
    bits = d.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _load_fp16_le(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _c_lround(v):
    """C's lroundf (half away from zero), then the x86 integer conversion: +-inf/NaN -> 0."""
    finite = tl.abs(v) < 2147483520.0
    v = tl.where(finite, v, 0.0)
    t = v.to(tl.int32)  # truncates toward zero
    frac = v - t.to(tl.float32)
    return t + (frac >= 0.5).to(tl.int32) - (frac <= -0.5).to(tl.int32)


@triton.jit
def _c_trunc(v):
    """C's (int) cast of a float as x86 does it: truncation, +-inf/NaN -> 0."""
    return tl.where(tl.abs(v) < 2147483520.0, v, 0.0).to(tl.int32)


@triton.jit
def _safe_recip(d):
    """`d ? 1.0f / d : 0.0f`."""
    nz = d != 0.0
    return tl.where(nz, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(nz, d, 1.0)), 0.0)


@triton.jit
def _best_index_int8(al, cb_ptr):
    """ggml's best_index_int8 over the n = IQ4_NL_LEVELS sorted IQ4_NL values, for a 1-D or 2-D tile `al`: the
    binary search lands on the ml with val[ml] <= al < val[ml+1], i.e. the count of val[1..n-2] <= al."""
    k = tl.arange(0, IQ4_NL_LEVELS)
    inner = ((k >= 1) & (k <= IQ4_NL_LEVELS - 2)).to(tl.int32)
    vals = tl.load(cb_ptr + k)
    if len(al.shape) == 1:
        ml = tl.sum((vals[None, :] <= al[:, None]).to(tl.int32) * inner[None, :], axis=1)
    else:
        ml = tl.sum((vals[None, None, :] <= al[:, :, None]).to(tl.int32) * inner[None, None, :], axis=2)
    lo = tl.load(cb_ptr + ml)
    hi = tl.load(cb_ptr + ml + 1)
    idx = tl.where(al - lo < hi - al, ml, ml + 1)
    idx = tl.where(al <= tl.load(cb_ptr), 0, idx)
    return tl.where(al >= tl.load(cb_ptr + IQ4_NL_LEVELS - 1), IQ4_NL_LEVELS - 1, idx)


# --------------------------------------------------------------------------------- Q8_0
@triton.jit
def _quantize_q8_0(x_ptr, y_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    cols = tl.arange(0, Q8_0_BLOCK)
    x = tl.load(x_ptr + rows[:, None] * Q8_0_BLOCK + cols[None, :], mask=rmask[:, None], other=0.0)
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((BLOCKS,), Q8_0_RANGE, tl.float32))
    q = _c_lround(x * _safe_recip(d)[:, None])
    yb = y_ptr + rows.to(tl.int64) * Q8_0_BYTES
    _store_fp16_le(yb + Q8_0_SCALE, d, rmask)
    tl.store(yb[:, None] + Q8_0_QS + cols[None, :], q.to(tl.int8).to(tl.uint8, bitcast=True), mask=rmask[:, None])


@triton.jit
def _dequantize_q8_0(y_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    cols = tl.arange(0, Q8_0_BLOCK)
    yb = y_ptr + rows.to(tl.int64) * Q8_0_BYTES
    d = _load_fp16_le(yb + Q8_0_SCALE, rmask)
    q = tl.load(yb[:, None] + Q8_0_QS + cols[None, :], mask=rmask[:, None], other=0).to(tl.int8, bitcast=True)
    out = q.to(tl.float32) * d[:, None]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * Q8_0_BLOCK + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None],
    )


# ------------------------------------------------------------------ halves layout (q4_0, iq4_nl)
@triton.jit
def _load_halves(x_ptr, rows, rmask, BLOCK: tl.constexpr):
    """A block as its two halves [BLOCKS, BLOCK/2]: elements 0..BLOCK/2-1 and BLOCK/2.. (byte j packs j and
    j + BLOCK/2)."""
    c = tl.arange(0, BLOCK // 2)
    base = x_ptr + rows.to(tl.int64)[:, None] * BLOCK + c[None, :]
    return tl.load(base, mask=rmask[:, None], other=0.0), tl.load(base + BLOCK // 2, mask=rmask[:, None], other=0.0)


@triton.jit
def _first_absmax(lo, hi, BLOCK: tl.constexpr):
    """(amax, signed value of the first element of largest |x|), +0 for an all-zero block (ggml)."""
    c = tl.arange(0, BLOCK // 2)[None, :]
    amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    first = tl.minimum(
        tl.min(tl.where(tl.abs(lo) == amax[:, None], c, BLOCK), axis=1),
        tl.min(tl.where(tl.abs(hi) == amax[:, None], c + BLOCK // 2, BLOCK), axis=1),
    )
    mx = tl.sum(tl.where(c == first[:, None], lo, 0.0), axis=1) + tl.sum(
        tl.where(c + BLOCK // 2 == first[:, None], hi, 0.0), axis=1
    )
    return amax, tl.where(amax > 0.0, mx, 0.0)


@triton.jit
def _store_halves(
    y_ptr, rows, rmask, d, qlo, qhi, BLOCK: tl.constexpr, BYTES: tl.constexpr, SCALE: tl.constexpr, QS: tl.constexpr
):
    yb = y_ptr + rows.to(tl.int64) * BYTES
    _store_fp16_le(yb + SCALE, d, rmask)
    c = tl.arange(0, BLOCK // 2)
    tl.store(yb[:, None] + QS + c[None, :], (qlo | (qhi << 4)).to(tl.uint8), mask=rmask[:, None])


@triton.jit
def _load_packed_halves(
    y_ptr, rows, rmask, BLOCK: tl.constexpr, BYTES: tl.constexpr, SCALE: tl.constexpr, QS: tl.constexpr
):
    yb = y_ptr + rows.to(tl.int64) * BYTES
    c = tl.arange(0, BLOCK // 2)
    b = tl.load(yb[:, None] + QS + c[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    return _load_fp16_le(yb + SCALE, rmask), b & 0xF, b >> 4


@triton.jit
def _store_out_halves(out_ptr, rows, rmask, lo, hi, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK // 2)
    base = out_ptr + rows.to(tl.int64)[:, None] * BLOCK + c[None, :]
    tl.store(base, lo.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(base + BLOCK // 2, hi.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _quantize_q4_0(x_ptr, y_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    lo, hi = _load_halves(x_ptr, rows, rmask, Q4_0_BLOCK)
    _, mx = _first_absmax(lo, hi, Q4_0_BLOCK)
    d = tl.math.div_rn(mx, tl.full((BLOCKS,), -8.0, tl.float32))
    inv = _safe_recip(d)[:, None]
    qlo = tl.minimum(_c_trunc(lo * inv + 8.5), 15)
    qhi = tl.minimum(_c_trunc(hi * inv + 8.5), 15)
    _store_halves(y_ptr, rows, rmask, d, qlo, qhi, Q4_0_BLOCK, Q4_0_BYTES, Q4_0_SCALE, Q4_0_QS)


@triton.jit
def _dequantize_q4_0(y_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    d, qlo, qhi = _load_packed_halves(y_ptr, rows, rmask, Q4_0_BLOCK, Q4_0_BYTES, Q4_0_SCALE, Q4_0_QS)
    _store_out_halves(
        out_ptr, rows, rmask, (qlo - 8).to(tl.float32) * d[:, None], (qhi - 8).to(tl.float32) * d[:, None], Q4_0_BLOCK
    )


@triton.jit
def _iq4nl_sums(x_ptr, rows, rmask, inv, cb_ptr):
    """sumqx = sum (w*q)*x and sumq2 = sum (w*q)*q over the block, sequentially (ggml's order)."""
    sumqx = tl.zeros(inv.shape, tl.float32)
    sumq2 = tl.zeros(inv.shape, tl.float32)
    base = x_ptr + rows.to(tl.int64) * IQ4_NL_BLOCK
    for j in range(IQ4_NL_BLOCK):
        xj = tl.load(base + j, mask=rmask, other=0.0)
        q = tl.load(cb_ptr + _best_index_int8(inv * xj, cb_ptr))
        wq = (xj * xj) * q
        sumqx = sumqx + wq * xj
        sumq2 = sumq2 + wq * q
    return sumqx, sumq2


@triton.jit
def _quantize_iq4_nl(x_ptr, y_ptr, cb_ptr, n_blocks, BLOCKS: tl.constexpr):
    """ggml's quantize_row_iq4_nl_impl (super block = block, ntry 7, no imatrix)."""
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    lo, hi = _load_halves(x_ptr, rows, rmask, IQ4_NL_BLOCK)
    amax, mx = _first_absmax(lo, hi, IQ4_NL_BLOCK)
    live = amax >= 1e-15
    mx = tl.where(live, mx, 1.0)  # dead blocks stay finite; their scale is forced to 0 below
    v0 = tl.load(cb_ptr)
    d = tl.math.div_rn(-mx, tl.zeros_like(mx) + v0)
    sumqx, sumq2 = _iq4nl_sums(x_ptr, rows, rmask, _safe_recip(d), cb_ptr)
    d = tl.math.div_rn(sumqx, sumq2)
    best = d * sumqx
    for itry in range(-7, 8):
        inv = tl.math.div_rn(tl.zeros_like(mx) + (itry + v0), mx)
        sumqx, sumq2 = _iq4nl_sums(x_ptr, rows, rmask, inv, cb_ptr)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = tl.where(better, tl.math.div_rn(sumqx, tl.where(better, sumq2, 1.0)), d)
        best = tl.where(better, d * sumqx, best)
    scale = tl.where(live, d, 0.0)
    inv = _safe_recip(scale)[:, None]
    _store_halves(
        y_ptr,
        rows,
        rmask,
        scale,
        _best_index_int8(lo * inv, cb_ptr),
        _best_index_int8(hi * inv, cb_ptr),
        IQ4_NL_BLOCK,
        IQ4_NL_BYTES,
        IQ4_NL_SCALE,
        IQ4_NL_QS,
    )


@triton.jit
def _dequantize_iq4_nl(y_ptr, out_ptr, cb_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    d, qlo, qhi = _load_packed_halves(y_ptr, rows, rmask, IQ4_NL_BLOCK, IQ4_NL_BYTES, IQ4_NL_SCALE, IQ4_NL_QS)
    _store_out_halves(
        out_ptr, rows, rmask, d[:, None] * tl.load(cb_ptr + qlo), d[:, None] * tl.load(cb_ptr + qhi), IQ4_NL_BLOCK
    )


# ---------------------------------------------------------------------------------- RQ4
@triton.jit
def _quantize_rq4(x_ptr, y_ptr, cb_ptr, n_blocks, BLOCKS: tl.constexpr):
    """The fork's quantize_row_rq4_ref: absmax scale, first nearest of 16 codebook entries."""
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    c = tl.arange(0, RQ4_BLOCK // 2)
    base = x_ptr + rows.to(tl.int64)[:, None] * RQ4_BLOCK + 2 * c[None, :]
    ev = tl.load(base, mask=rmask[:, None], other=0.0)  # elements 2j   (low nibble of byte j)
    od = tl.load(base + 1, mask=rmask[:, None], other=0.0)  # elements 2j+1 (high nibble)
    amax = tl.maximum(tl.max(tl.abs(ev), axis=1), tl.max(tl.abs(od), axis=1))
    d = tl.math.div_rn(amax, tl.zeros_like(amax) + tl.load(cb_ptr + RQ4_LEVELS - 1))
    big = d > 1e-10
    inv = tl.where(big, tl.math.div_rn(tl.zeros_like(d) + 1.0, tl.where(big, d, 1.0)), 0.0)[:, None]
    ve, vo = ev * inv, od * inv
    best_e = tl.full(ve.shape, 1e10, tl.float32)
    best_o = tl.full(vo.shape, 1e10, tl.float32)
    ie = tl.zeros(ve.shape, tl.int32)
    io = tl.zeros(vo.shape, tl.int32)
    for k in tl.static_range(RQ4_LEVELS):  # strict `<`: the first nearest entry wins
        cbk = tl.load(cb_ptr + k)
        de, do = tl.abs(ve - cbk), tl.abs(vo - cbk)
        ie = tl.where(de < best_e, k, ie)
        best_e = tl.minimum(de, best_e)
        io = tl.where(do < best_o, k, io)
        best_o = tl.minimum(do, best_o)
    yb = y_ptr + rows.to(tl.int64) * RQ4_BYTES
    _store_fp16_le(yb + RQ4_SCALE, d, rmask)
    tl.store(yb[:, None] + RQ4_QS + c[None, :], (ie | (io << 4)).to(tl.uint8), mask=rmask[:, None])


@triton.jit
def _dequantize_rq4(y_ptr, out_ptr, cb_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    c = tl.arange(0, RQ4_BLOCK // 2)
    yb = y_ptr + rows.to(tl.int64) * RQ4_BYTES
    d = _load_fp16_le(yb + RQ4_SCALE, rmask)[:, None]
    b = tl.load(yb[:, None] + RQ4_QS + c[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    base = out_ptr + rows.to(tl.int64)[:, None] * RQ4_BLOCK + 2 * c[None, :]
    tl.store(base, (tl.load(cb_ptr + (b & 0xF)) * d).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(base + 1, (tl.load(cb_ptr + (b >> 4)) * d).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


# -------------------------------------------------------------------------------- TQ2_0
@triton.jit
def _tq2_offsets(rows):
    """[BLOCKS, index bytes] element offsets of lane 0 for byte k = STRIDE c + m: element LANES STRIDE c + m
    (+ STRIDE l for lane l)."""
    k = tl.arange(0, TQ2_0_QS_BYTES)
    lane0 = TQ2_0_LANES * TQ2_0_STRIDE * (k // TQ2_0_STRIDE) + (k % TQ2_0_STRIDE)
    offs = rows.to(tl.int64)[:, None] * TQ2_0_BLOCK + lane0[None, :]
    return offs


@triton.jit
def _quantize_tq2_0(x_ptr, y_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    offs = _tq2_offsets(rows)
    m = rmask[:, None]
    amax = tl.zeros((BLOCKS,), tl.float32)
    for lane in tl.static_range(TQ2_0_LANES):
        amax = tl.maximum(amax, tl.max(tl.abs(tl.load(x_ptr + offs + TQ2_0_STRIDE * lane, mask=m, other=0.0)), axis=1))
    inv = _safe_recip(amax)[:, None]
    q = tl.zeros(offs.shape, tl.int32)
    for lane in tl.static_range(TQ2_0_LANES):
        x = tl.load(x_ptr + offs + TQ2_0_STRIDE * lane, mask=m, other=0.0)
        q = q | (((_c_lround(x * inv) + 1) & TQ2_0_MASK) << (TQ2_0_BITS * lane))
    yb = y_ptr + rows.to(tl.int64) * TQ2_0_BYTES
    k = tl.arange(0, TQ2_0_QS_BYTES)
    tl.store(yb[:, None] + TQ2_0_QS + k[None, :], q.to(tl.uint8), mask=m)
    _store_fp16_le(yb + TQ2_0_SCALE, amax, rmask)


@triton.jit
def _dequantize_tq2_0(y_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    rmask = rows < n_blocks
    m = rmask[:, None]
    yb = y_ptr + rows.to(tl.int64) * TQ2_0_BYTES
    k = tl.arange(0, TQ2_0_QS_BYTES)
    b = tl.load(yb[:, None] + TQ2_0_QS + k[None, :], mask=m, other=0).to(tl.int32)
    d = _load_fp16_le(yb + TQ2_0_SCALE, rmask)[:, None]
    offs = _tq2_offsets(rows)
    for lane in tl.static_range(TQ2_0_LANES):
        v = (((b >> (TQ2_0_BITS * lane)) & TQ2_0_MASK) - 1).to(tl.float32) * d
        tl.store(out_ptr + offs + TQ2_0_STRIDE * lane, v.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------ launchers
QUANTIZE_KERNELS = {
    "q8_0": _quantize_q8_0,
    "q4_0": _quantize_q4_0,
    "iq4_nl": _quantize_iq4_nl,
    "rq4": _quantize_rq4,
    "tq2_0": _quantize_tq2_0,
}
DEQUANTIZE_KERNELS = {
    "q8_0": _dequantize_q8_0,
    "q4_0": _dequantize_q4_0,
    "iq4_nl": _dequantize_iq4_nl,
    "rq4": _dequantize_rq4,
    "tq2_0": _dequantize_tq2_0,
}


def launch_config(fmt: str, key: str) -> dict:
    """BLOCKS (ggml blocks per program, a power of two) and num_warps for `fmt` on arch `key`."""
    cfg = LAUNCH_CONFIGS[key]
    divisor = 1 if key == "interpreter" else TILE_DIVISOR.get(fmt, 1)  # the interpreter pays per program
    blocks = max(1, cfg["tile_weights"] // divisor // get_format(fmt).block_size)
    return {"BLOCKS": triton.next_power_of_2(blocks), "num_warps": cfg["num_warps"]}


def _config(fmt: str, device: torch.device) -> dict:
    return launch_config(fmt, arch_key(device))


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """float tensor [..., K] -> uint8 [..., K // block * bytes] of ggml blocks (inputs validated by the op)."""
    f = get_format(fmt)
    src = x.to(torch.float32).contiguous()
    n_blocks = src.numel() // f.block_size
    out = torch.empty(
        (*x.shape[:-1], x.shape[-1] // f.block_size * f.bytes_per_block), dtype=torch.uint8, device=x.device
    )
    if n_blocks == 0:
        return out
    cfg = _config(f.name, x.device)
    args = (src, out) + ((f.codebook_tensor(x.device),) if f.codebook is not None else ()) + (n_blocks,)
    QUANTIZE_KERNELS[f.name][(triton.cdiv(n_blocks, cfg["BLOCKS"]),)](
        *args, BLOCKS=cfg["BLOCKS"], num_warps=cfg["num_warps"], enable_fp_fusion=False
    )
    return out


def dequantize(blocks: torch.Tensor, fmt: str, shape, dtype: torch.dtype) -> torch.Tensor:
    f = get_format(fmt)
    n_blocks = blocks.numel() // f.bytes_per_block
    out = torch.empty(list(shape), dtype=dtype if dtype != torch.float64 else torch.float32, device=blocks.device)
    if n_blocks:
        cfg = _config(f.name, blocks.device)
        args = (blocks.contiguous(), out) + ((f.codebook_tensor(blocks.device),) if f.codebook is not None else ())
        DEQUANTIZE_KERNELS[f.name][(triton.cdiv(n_blocks, cfg["BLOCKS"]),)](
            *args, n_blocks, BLOCKS=cfg["BLOCKS"], num_warps=cfg["num_warps"]
        )
    return out.to(dtype)


def aot_specs(arch: str = "gfx11") -> list[dict]:
    """Every kernel with a concrete signature and `arch`'s launch config, for felix.ops.aot."""
    specs = []
    for name in QUANTIZE_KERNELS:
        f = get_format(name)
        cfg = launch_config(name, arch)
        blocks = cfg["BLOCKS"]
        cb = {"cb_ptr": "*fp32"} if f.codebook is not None else {}
        specs.append(
            {
                "name": f"quantize_{name}",
                "fn": QUANTIZE_KERNELS[name],
                "signature": {"x_ptr": "*fp32", "y_ptr": "*u8", **cb, "n_blocks": "i32", "BLOCKS": "constexpr"},
                "constexprs": {"BLOCKS": blocks},
                "options": {"num_warps": cfg["num_warps"], "enable_fp_fusion": False},
            }
        )
        for out_ty in ("fp32", "fp16", "bf16"):
            specs.append(
                {
                    "name": f"dequantize_{name}_{out_ty}",
                    "fn": DEQUANTIZE_KERNELS[name],
                    "signature": {
                        "y_ptr": "*u8",
                        "out_ptr": f"*{out_ty}",
                        **cb,
                        "n_blocks": "i32",
                        "BLOCKS": "constexpr",
                    },
                    "constexprs": {"BLOCKS": blocks},
                    "options": {"num_warps": cfg["num_warps"]},
                }
            )
    return specs
