"""Quantized matmul, the spec: y = x @ dequantize(W)^T, and the 4-bit block layout every kernel uses.

The weight W [N, K] is stored as ggml blocks (uint8 [N, K / 32 * 18]) of a 4-bit, 32-weight format:
q4_0, iq4_nl or rq4. All three share one decoder shape: an fp16 scale d, then 16 bytes of 4-bit
indices, each decoding to ``d * table[index]``. They differ only in the 16-entry value table and in
which element each nibble holds ("halves": byte j = q[j] | q[j+16] << 4; "pairs": byte j =
q[2j] | q[2j+1] << 4).

:func:`four_bit_layout` derives both facts by decoding probe blocks with the reference codec
(felix/reference/codecs.py, itself the spec checked byte for byte against ggml), so no kernel, Triton
or HIP, carries its own copy of a codebook or nibble order.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from felix.formats import get_format
from felix.reference import codecs

QUANT_MATMUL_FORMATS = ("q4_0", "iq4_nl", "rq4")


class FourBitLayout(NamedTuple):
    fmt: str
    table: tuple        # 16 float32 values: index -> weight in units of the block scale
    pairs: bool         # True: byte j holds elements 2j, 2j+1; False: elements j, j+16
    qs_offset: int      # byte offset of the 16 index bytes inside a block
    scale_offset: int   # byte offset of the fp16 scale


@functools.lru_cache(maxsize=None)
def four_bit_layout(fmt: str) -> FourBitLayout:
    """The value table and nibble order of a 4-bit 32-weight format, read off the reference decoder."""
    f = get_format(fmt)
    if f.name not in QUANT_MATMUL_FORMATS:
        raise ValueError(f"quant_matmul supports the 4-bit formats {', '.join(QUANT_MATMUL_FORMATS)}, "
                         f"not {f.name!r}")
    assert f.block_size == 32 and f.bytes_per_block == 18 and f.scale_offset == 0, f
    qs_offset = f.scale_offset + 2
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)

    def probe(qs: torch.Tensor) -> torch.Tensor:  # one block, scale 1.0, the given 16 index bytes
        block = torch.zeros(1, 18, dtype=torch.uint8)
        block[0, f.scale_offset:f.scale_offset + 2] = one
        block[0, qs_offset:qs_offset + 16] = qs
        return codecs.dequantize(block, f.name, [32], torch.float32)

    table = tuple(float(probe(torch.full((16,), i | (i << 4), dtype=torch.uint8))[0]) for i in range(16))
    ramp = probe(torch.arange(16, dtype=torch.uint8))  # low nibble j, high nibble 0
    pairs = float(ramp[1]) == table[0]                 # element 1: high nibble of byte 0 (pairs) or byte 1
    expect = [table[j // 2] if j % 2 == 0 else table[0] for j in range(32)] if pairs else \
        [table[j] if j < 16 else table[0] for j in range(32)]
    if ramp.tolist() != expect:
        raise AssertionError(f"{f.name}: the reference decoder's nibble order is neither pairs nor halves")
    return FourBitLayout(f.name, table, pairs, qs_offset, f.scale_offset)


def decode_table(fmt: str, device="cpu") -> torch.Tensor:
    """The 16-entry float32 value table of `fmt` as a tensor (kernels take it as an argument)."""
    return _table_tensor(get_format(fmt).name, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _table_tensor(fmt: str, device: str) -> torch.Tensor:
    return torch.tensor(four_bit_layout(fmt).table, dtype=torch.float32, device=device)


def quant_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str, out_features: int) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16) @ dequantize(blocks)^T -> [M, N] in x's dtype; float32 math."""
    w = codecs.dequantize(blocks.reshape(-1, 18), fmt, [out_features, x.shape[-1]], torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
