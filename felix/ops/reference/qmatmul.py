"""Quantized matmul, the spec: y = x @ dequantize(W)^T, and the 4-bit block layout every kernel uses.

The weight W [N, K] is stored as ggml blocks (uint8 [N, K / block * bytes_per_block]) of a 4-bit format, the
table's "halves" and "pairs" packings (felix/core/formats.py): q4_0, iq4_nl and rq4. All share one decoder shape: an
fp16 scale d, then block/2 bytes of 4-bit indices, each decoding to ``d * table[index]``. They differ only in the
16-entry value table and in which element each nibble holds ("halves": byte j = q[j] | q[j+block/2] << 4;
"pairs": byte j = q[2j] | q[2j+1] << 4).

:func:`four_bit_layout` takes the geometry from the format table and derives the value table (and checks the
nibble order) by decoding probe blocks with the reference codec (felix/ops/reference/codecs.py, itself the spec checked
byte for byte against ggml), so no kernel, Triton or HIP, carries its own copy of a codebook or nibble order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from felix.core.formats import formats_with_packing, get_format
from felix.ops.reference import codecs

QUANT_MATMUL_FORMATS = formats_with_packing("halves", "pairs")


class FourBitLayout(NamedTuple):
    fmt: str
    table: tuple  # 16 float32 values: index -> weight in units of the block scale
    pairs: bool  # True: byte j holds elements 2j, 2j+1; False: elements j, j + block/2
    qs_offset: int  # byte offset of the block/2 index bytes inside a block
    scale_offset: int  # byte offset of the fp16 scale
    block_size: int  # weights per block
    bytes_per_block: int


@functools.lru_cache(maxsize=None)
def four_bit_layout(fmt: str) -> FourBitLayout:
    """The geometry (from the format table), value table and nibble order (read off the reference decoder) of a
    4-bit format."""
    f = get_format(fmt)
    if f.name not in QUANT_MATMUL_FORMATS:
        raise ValueError(f"quant_matmul supports the 4-bit formats {', '.join(QUANT_MATMUL_FORMATS)}, not {f.name!r}")
    half = f.block_size // 2
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)

    def probe(qs: torch.Tensor) -> torch.Tensor:  # one block, scale 1.0, the given index bytes
        block = torch.zeros(1, f.bytes_per_block, dtype=torch.uint8)
        block[0, f.scale_slice] = one
        block[0, f.qs_slice] = qs
        return codecs.dequantize(block, f.name, [f.block_size], torch.float32)

    levels = 1 << f.index_bits
    table = tuple(float(probe(torch.full((half,), i | (i << 4), dtype=torch.uint8))[0]) for i in range(levels))
    ramp = probe(torch.arange(half, dtype=torch.uint8) % levels)  # low nibble j (mod 16), high nibble 0
    pairs = f.packing == "pairs"
    expect = (
        [table[(j // 2) % levels] if j % 2 == 0 else table[0] for j in range(f.block_size)]
        if pairs
        else [table[j % levels] if j < half else table[0] for j in range(f.block_size)]
    )
    if ramp.tolist() != expect:
        raise AssertionError(f"{f.name}: the reference decoder disagrees with the table's {f.packing!r} packing")
    return FourBitLayout(f.name, table, pairs, f.qs_offset, f.scale_offset, f.block_size, f.bytes_per_block)


def decode_table(fmt: str, device="cpu") -> torch.Tensor:
    """The 16-entry float32 value table of `fmt` as a tensor (kernels take it as an argument)."""
    return _table_tensor(get_format(fmt).name, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _table_tensor(fmt: str, device: str) -> torch.Tensor:
    return torch.tensor(four_bit_layout(fmt).table, dtype=torch.float32, device=device)


def quant_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str, out_features: int) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16) @ dequantize(blocks)^T -> [M, N] in x's dtype; float32 math."""
    w = codecs.dequantize(
        blocks.reshape(-1, get_format(fmt).bytes_per_block), fmt, [out_features, x.shape[-1]], torch.float32
    )
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
