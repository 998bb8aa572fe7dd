"""Pure-torch block codecs: the spec every other backend is tested against.

Each quantizer reproduces ggml's C reference (`quantize_row_*_ref` in ggml-quants.c, and the fork's
`quantize_row_rq4_ref`) operation for operation in float32, so its bytes equal ggml's:

* every value is float32 and every operation is the same IEEE operation as in C (no fused
  multiply-add, no division turned into a multiplication by a reciprocal: constants are float32
  tensors, never Python scalars that a kernel may treat differently);
* sums that ggml accumulates sequentially (IQ4_NL's scale search) are accumulated sequentially;
* ties break as in C: first maximum of |x| (Q4_0, IQ4_NL), first nearest codebook entry (RQ4),
  upper neighbour on an exact midpoint (IQ4_NL's best_index_int8), rounding half away from zero
  (roundf / lroundf).

Blocks so small (amax below ~1e-37) that ggml's reciprocal 1/d overflows to inf make ggml convert
+-inf/NaN to an integer, which C leaves undefined; on x86, where llama.cpp is built here, the result
is INT_MIN, whose low bits are 0. Felix fixes that behaviour on every backend (`_c_float_to_int`):
such values encode as integer 0. They all decode to 0 anyway (their fp16 scale is 0).

All-zero blocks follow the C code: Q4_0 stores d = -0.0 (fp16 0x8000) and index 8, IQ4_NL d = 0 and
index 8, RQ4 d = 0 and index 7 (the fork's Python tool writes index 0; both decode to 0), Q8_0 and
TQ2_0 zeros.

Functions take a float32 tensor whose last dimension is a multiple of the block size (callers
validate) and work on any device. Block geometry (block size, where the scale and the indices sit, how
the indices are packed) is read from the format table, felix/core/formats.py; nothing here restates it.
"""

from __future__ import annotations

import torch

from felix.core.formats import FORMATS, get_format

F32 = torch.float32


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant shaped like `like`, so the op is a true tensor-tensor IEEE op."""
    return torch.full_like(like, value, dtype=F32)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf/lroundf: round half away from zero, exactly (no v+0.5 double rounding)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def _c_float_to_int(v: torch.Tensor) -> torch.Tensor:
    """C's float -> integer conversion as x86 does it: non-finite values become 0 (see module doc)."""
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v)).to(torch.int64)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> the little-endian bytes of fp16(d) (round to nearest even), [n, 2]."""
    return d.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n]."""
    return b.contiguous().view(torch.float16).view(-1).to(F32)


def _first_absmax(xb: torch.Tensor):
    """(amax, max) with max the signed value of the *first* element of largest |x| (+0 if none)."""
    ax = xb.abs()
    amax = ax.amax(dim=1)
    pos = torch.arange(xb.shape[1], device=xb.device).expand_as(xb)
    first = torch.where(ax == amax[:, None], pos, xb.shape[1]).amin(dim=1, keepdim=True)
    first = first.clamp(max=xb.shape[1] - 1)
    signed = xb.gather(1, first).squeeze(1)
    # ggml starts from amax = max = 0 and only replaces on a strict `>`, so an all-zero block
    # keeps max = +0 even if it holds -0.0.
    return amax, torch.where(amax > 0, signed, torch.zeros_like(signed))


def _pack_halves(idx: torch.Tensor) -> torch.Tensor:
    """[nb, block] 4-bit indices -> [nb, block/2] bytes, byte j = idx[j] | idx[j + block/2] << 4 (Q4_0, IQ4_NL)."""
    half = idx.shape[1] // 2
    return (idx[:, :half] | (idx[:, half:] << 4)).to(torch.uint8)


def _unpack_halves(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int64)
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _pack_pairs(idx: torch.Tensor) -> torch.Tensor:
    """[nb, block] 4-bit indices -> [nb, block/2] bytes, byte j = idx[2j] | idx[2j+1] << 4 (RQ4)."""
    return (idx[:, 0::2] | (idx[:, 1::2] << 4)).to(torch.uint8)


def _unpack_pairs(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int64)
    return torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _crumb_shape(f, nb: int) -> tuple[int, int, int, int]:
    """ "crumbs" packing as [block, group c, lane l, byte m]: element (lanes * stride) c + stride l + m sits in byte
    stride c + m, bits index_bits * l (TQ2_0)."""
    lanes = 8 // f.index_bits
    return nb, f.block_size // (lanes * f.crumb_stride), lanes, f.crumb_stride


def _pack_crumbs(idx: torch.Tensor, f) -> torch.Tensor:
    nb, groups, lanes, stride = _crumb_shape(f, idx.shape[0])
    shifts = (f.index_bits * torch.arange(lanes, device=idx.device)).view(1, 1, lanes, 1)
    mask = (1 << f.index_bits) - 1
    return ((idx.view(nb, groups, lanes, stride) & mask) << shifts).sum(dim=2).to(torch.uint8).view(nb, f.qs_bytes)


def _unpack_crumbs(qs: torch.Tensor, f) -> torch.Tensor:
    nb, groups, lanes, stride = _crumb_shape(f, qs.shape[0])
    shifts = (f.index_bits * torch.arange(lanes, device=qs.device)).view(1, 1, lanes, 1)
    mask = (1 << f.index_bits) - 1
    return ((qs.to(torch.int64).view(nb, groups, 1, stride) >> shifts) & mask).view(nb, f.block_size)


PACK = {"halves": _pack_halves, "pairs": _pack_pairs}
UNPACK = {"halves": _unpack_halves, "pairs": _unpack_pairs}


def _blocks_of(x: torch.Tensor, f) -> torch.Tensor:
    """float [..., K] -> float32 [n_blocks, block_size]."""
    return x.reshape(-1, f.block_size).to(F32)


def _assemble(f, scale: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Blocks [nb, bytes_per_block] from fp32 scales [nb] and packed index bytes [nb, qs_bytes], each at its offset."""
    out = torch.empty(qs.shape[0], f.bytes_per_block, dtype=torch.uint8, device=qs.device)
    out[:, f.scale_slice] = _fp16_bytes(scale)
    out[:, f.qs_slice] = qs
    return out


def pack_blocks(fmt: str, scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Blocks uint8 [nb, bytes_per_block] of format `fmt` from scales [nb] (rounded to fp16) and unsigned indices
    [nb, block_size] in element order, laid out as the format table says (for codecs outside this module, e.g.
    felix.model.qat's BitNet absmean ternary, that choose their own scale but share a format's bytes)."""
    f = get_format(fmt)
    if f.packing == "int8":
        qs = idx.to(torch.int8).view(torch.uint8)
    elif f.packing == "crumbs":
        qs = _pack_crumbs(idx.to(torch.int64), f)
    else:
        qs = PACK[f.packing](idx.to(torch.int64))
    return _assemble(f, scale.to(F32), qs)


def _scale_of(blocks: torch.Tensor, f) -> torch.Tensor:
    return _fp16_from_bytes(blocks[:, f.scale_slice])


def _indices_of(blocks: torch.Tensor, f) -> torch.Tensor:
    """The unpacked index of every weight, [nb, block_size], in element order."""
    qs = blocks[:, f.qs_slice]
    if f.packing == "crumbs":
        return _unpack_crumbs(qs, f)
    return UNPACK[f.packing](qs)


# ---------------------------------------------------------------------------------------------
# Q8_0
Q8_0 = FORMATS["q8_0"]


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks_of(x, Q8_0)
    amax = xb.abs().amax(dim=1)
    d = amax / _const(Q8_0.range_divisor, amax)
    inv = _safe_reciprocal(d)
    q = _c_float_to_int(_round_half_away(xb * inv[:, None])).to(torch.int8)
    return _assemble(Q8_0, d, q.view(torch.uint8))


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks[:, Q8_0.qs_slice].contiguous().view(torch.int8).to(F32)
    return q * _scale_of(blocks, Q8_0)[:, None]


# ---------------------------------------------------------------------------------------------
# Q4_0
Q4_0 = FORMATS["q4_0"]


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks_of(x, Q4_0)
    _, mx = _first_absmax(xb)
    d = mx / _const(-8.0, mx)
    inv = _safe_reciprocal(d)
    v = xb * inv[:, None] + _const(8.5, xb)
    idx = torch.clamp(_c_float_to_int(torch.trunc(v)), max=15)  # (int8_t) cast truncates, MIN(15, .)
    return _assemble(Q4_0, d, PACK[Q4_0.packing](idx))


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _indices_of(blocks, Q4_0).to(F32) - 8.0
    return q * _scale_of(blocks, Q4_0)[:, None]


# ---------------------------------------------------------------------------------------------
# IQ4_NL (ggml's quantize_row_iq4_nl_impl with super block = block = 32, ntry = 7, no imatrix)
IQ4_NL_NTRY = 7
GROUP_MAX_EPS = 1e-15


def _best_index_int8(al: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 for a sorted grid `vals` (float32 [16]), elementwise over `al`."""
    n = vals.numel()
    # The binary search ends on the unique ml with vals[ml] <= al < vals[ml+1].
    ml = (al[..., None] >= vals[1 : n - 1]).sum(dim=-1)
    lo, hi = vals[ml], vals[ml + 1]
    idx = torch.where((al - lo) < (hi - al), ml, ml + 1)
    idx = torch.where(al <= vals[0], torch.zeros_like(idx), idx)
    return torch.where(al >= vals[n - 1], torch.full_like(idx, n - 1), idx)


def _iq4nl_sums(xb, w, inv, vals):
    """Sequential float32 sums over the block, as the C loop: sumqx += w*q*x; sumq2 += w*q*q."""
    sumqx = torch.zeros_like(inv)
    sumq2 = torch.zeros_like(inv)
    for j in range(xb.shape[1]):
        q = vals[_best_index_int8(inv * xb[:, j], vals)]
        wq = w[:, j] * q
        sumqx = sumqx + wq * xb[:, j]
        sumq2 = sumq2 + wq * q
    return sumqx, sumq2


IQ4_NL = FORMATS["iq4_nl"]


def quantize_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    fmt = IQ4_NL
    xb = _blocks_of(x, fmt)
    vals = fmt.codebook_tensor(xb.device)
    w = xb * xb
    amax, mx = _first_absmax(xb)
    live = amax >= _const(GROUP_MAX_EPS, amax)
    mx_safe = torch.where(live, mx, torch.ones_like(mx))  # keep dead blocks finite; masked below

    d = -mx_safe / vals[0].expand_as(mx_safe)
    sumqx, sumq2 = _iq4nl_sums(xb, w, 1.0 / d, vals)
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-IQ4_NL_NTRY, IQ4_NL_NTRY + 1):
        inv = _const(float(itry) + vals[0].item(), mx_safe) / mx_safe
        sumqx, sumq2 = _iq4nl_sums(xb, w, inv, vals)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)

    scale = torch.where(live, d, torch.zeros_like(d))
    idx = _best_index_int8(_safe_reciprocal(scale)[:, None] * xb, vals)
    return _assemble(fmt, scale, PACK[fmt.packing](idx))


def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    vals = IQ4_NL.codebook_tensor(blocks.device)
    return _scale_of(blocks, IQ4_NL)[:, None] * vals[_indices_of(blocks, IQ4_NL)]


# ---------------------------------------------------------------------------------------------
# RQ4 (the fork's quantize_row_rq4_ref)
RQ4_MIN_SCALE = 1e-10


RQ4 = FORMATS["rq4"]


def quantize_rq4(x: torch.Tensor) -> torch.Tensor:
    fmt = RQ4
    xb = _blocks_of(x, fmt)
    cb = fmt.codebook_tensor(xb.device)
    amax = xb.abs().amax(dim=1)
    d = amax / cb[-1].expand_as(amax)
    big = d > _const(RQ4_MIN_SCALE, d)
    inv = torch.where(big, 1.0 / torch.where(big, d, torch.ones_like(d)), torch.zeros_like(d))
    v = xb * inv[:, None]
    best = torch.full_like(v, 1e10)
    idx = torch.zeros_like(v, dtype=torch.int64)
    for c in range(cb.numel()):  # linear search, strict `<`: the first nearest entry wins
        dist = (v - cb[c]).abs()
        closer = dist < best
        best = torch.where(closer, dist, best)
        idx = torch.where(closer, torch.full_like(idx, c), idx)
    return _assemble(fmt, d, PACK[fmt.packing](idx))


def dequantize_rq4(blocks: torch.Tensor) -> torch.Tensor:
    cb = RQ4.codebook_tensor(blocks.device)
    return cb[_indices_of(blocks, RQ4)] * _scale_of(blocks, RQ4)[:, None]


# ---------------------------------------------------------------------------------------------
# TQ2_0 (ternary, "crumbs" packing, scale after the indices)
TQ2_0 = FORMATS["tq2_0"]


def quantize_tq2_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks_of(x, TQ2_0)
    amax = xb.abs().amax(dim=1)
    inv = _safe_reciprocal(amax)
    q = _c_float_to_int(_round_half_away(xb * inv[:, None])) + 1  # -1, 0, 1 -> 0, 1, 2
    return _assemble(TQ2_0, amax, _pack_crumbs(q, TQ2_0))


def dequantize_tq2_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _indices_of(blocks, TQ2_0).to(F32) - 1.0
    return q * _scale_of(blocks, TQ2_0)[:, None]


# ---------------------------------------------------------------------------------------------
# TQ2_0 with BitNet b1.58's absmean scale: not ggml's quantizer (that is quantize_tq2_0's absmax above) but the one
# a BitNet-trained model ships with: same blocks, same decoder, a different choice of scale and therefore of indices.
def _tq2_0_absmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [nb, block] float32 in {-1, 0, 1}, d16 [nb] fp16) of BitNet b1.58 on TQ2_0's blocks."""
    f = TQ2_0
    if w.shape[-1] % f.block_size:
        raise ValueError(
            f"bitnet: the last dimension ({w.shape[-1]}) must be a multiple of TQ2_0's block "
            f"{f.block_size} (shape {tuple(w.shape)})"
        )
    xb = w.detach().reshape(-1, f.block_size).float()
    if not bool(torch.isfinite(xb).all()):
        raise ValueError("bitnet: the weights hold non-finite values (NaN/Inf)")
    d16 = (xb.double().abs().sum(1) / f.block_size).to(torch.float16)
    if bool(torch.isinf(d16).any()):
        raise ValueError("bitnet: a block's mean |w| overflows fp16")
    d = d16.float()
    nz = d > 0
    q = _round_half_away(xb / torch.where(nz, d, torch.ones_like(d))[:, None])
    return torch.where(nz[:, None], q.clamp(-1, 1), torch.zeros_like(q)), d16


def quantize_tq2_0_absmean(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58's ternary weights as TQ2_0 blocks (uint8 [..., K/block*bytes_per_block], ggml's TQ2_0 layout):
    per block, d = fp16(mean |w|), q = clamp(round(w / d), -1, 1) (round half away from zero), x = q * d.

    The mean is summed in float64, so no device's reduction order moves it across an fp16 rounding boundary in
    practice (the export recomputes it on the CPU from the same latent weights). felix.model.qat's ``bitnet`` mode
    trains through it and the exporter writes its tensors with it (felix.ops.quant_policy.encode_tensor, codec "bitnet")."""
    q, d16 = _tq2_0_absmean(w)
    blocks = pack_blocks("tq2_0", d16.float(), q.to(torch.int64) + 1)  # -1, 0, 1 -> 0, 1, 2, packed as the table says
    return blocks.reshape(*w.shape[:-1], -1)


def tq2_0_absmean_values(w: torch.Tensor) -> torch.Tensor:
    """What TQ2_0 decodes quantize_tq2_0_absmean(w) to (float32, w's shape), without packing the bytes: q * d16,
    the same product ggml's and Felix's TQ2_0 decoders form (tests check the equality bit for bit)."""
    q, d16 = _tq2_0_absmean(w)
    return (q * d16.float()[:, None]).reshape(w.shape)


QUANTIZE = {
    "q8_0": quantize_q8_0,
    "q4_0": quantize_q4_0,
    "iq4_nl": quantize_iq4_nl,
    "rq4": quantize_rq4,
    "tq2_0": quantize_tq2_0,
}
DEQUANTIZE = {
    "q8_0": dequantize_q8_0,
    "q4_0": dequantize_q4_0,
    "iq4_nl": dequantize_iq4_nl,
    "rq4": dequantize_rq4,
    "tq2_0": dequantize_tq2_0,
}


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """float tensor [..., K] -> uint8 [..., K // block * bytes_per_block] of ggml blocks."""
    f = get_format(fmt)
    blocks = QUANTIZE[f.name](x.contiguous())
    return blocks.reshape(*x.shape[:-1], -1)


def dequantize(blocks: torch.Tensor, fmt: str, shape, dtype=torch.float32) -> torch.Tensor:
    f = get_format(fmt)
    flat = blocks.contiguous().view(torch.uint8).reshape(-1, f.bytes_per_block)
    return DEQUANTIZE[f.name](flat).reshape(shape).to(dtype)
