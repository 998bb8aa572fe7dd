"""Block quantization ops: `felix.quantize` and `felix.dequantize`.

Declared once here as torch.library custom ops (``felix::quantize``, ``felix::dequantize``) with
the backend name as an argument, validated here, and implemented by the reference (torch), Triton
and C++ backends. Every backend produces ggml's exact bytes (see felix/ops/reference/codecs.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from felix.core.formats import QuantFormat, get_format
from felix.ops import _ext
from felix.ops.dispatch import register_impl, resolve_backend, implementation
from felix.ops.reference import codecs as reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------- validation
def _check_quantize_input(x: torch.Tensor, f: QuantFormat) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"quantize expects a floating-point tensor (float32/float16/bfloat16/float64), got dtype {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError("quantize expects a tensor with a last (row) dimension, got a scalar")
    if x.shape[-1] % f.block_size:
        raise ValueError(
            f"{f.name}: the last dimension ({x.shape[-1]}) must be a multiple of the "
            f"block size {f.block_size} (shape {tuple(x.shape)})"
        )
    if torch.compiler.is_compiling() or x.numel() == 0 or x.device.type == "meta":
        return  # value checks need a host sync (and values): eager callers get them, compiled graphs do not
    lo, hi = torch.aminmax(x.detach())  # one pass, no temporary; NaN propagates
    amax = torch.maximum(-lo, hi)
    if not bool(torch.isfinite(amax)):
        bad = (~torch.isfinite(x.detach())).nonzero()
        kinds = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(
            f"{f.name}: input holds {bad.shape[0]} non-finite value(s) ({kinds}), "
            f"first at index {tuple(bad[0].tolist())}"
        )
    if float(amax) > f.max_abs_input:
        raise ValueError(
            f"{f.name}: |x| reaches {float(amax):.4g}, beyond {f.max_abs_input:.4g}, "
            "where the block scale overflows fp16"
        )


def _blocks_per_shape(shape: Sequence[int], f: QuantFormat) -> int:
    if len(shape) == 0 or shape[-1] % f.block_size:
        raise ValueError(
            f"{f.name}: the last dimension of shape {tuple(shape)} must be a multiple of the block size {f.block_size}"
        )
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid shape {tuple(shape)}")
    return math.prod(shape) // f.block_size


def _check_dequantize_input(blocks: torch.Tensor, f: QuantFormat, shape, dtype) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        got = blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"dequantize expects a uint8 tensor of ggml blocks, got {got}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize can produce {', '.join(map(str, _FLOAT_DTYPES))}, not {dtype}")
    need = _blocks_per_shape(shape, f) * f.bytes_per_block
    if blocks.numel() != need:
        raise ValueError(
            f"{f.name}: shape {tuple(shape)} needs {need} bytes "
            f"({need // f.bytes_per_block} blocks of {f.bytes_per_block}), "
            f"the blocks tensor has {blocks.numel()}"
        )
    check_blocks_layout(blocks, block_shape(shape, f), f.name)


def block_shape(shape: Sequence[int], f: QuantFormat) -> tuple[int, ...]:
    """The shape of the blocks of a tensor of `shape`: ``[*shape[:-1], shape[-1] // block_size * bytes_per_block]``
    (what quantize returns)."""
    return (*shape[:-1], shape[-1] // f.block_size * f.bytes_per_block)


def check_blocks_layout(blocks: torch.Tensor, expected: tuple[int, ...], fmt: str) -> None:
    """Blocks are bytes in ggml's order: a contiguous uint8 tensor of whole blocks per row -- the `expected` shape
    quantize returns, a flat buffer, or any other contiguous view of the same bytes whose rows hold whole blocks. A
    transposed or strided view has the right byte count but not ggml's byte order, and would decode to garbage
    without a word: refused."""
    if not blocks.is_contiguous():
        raise ValueError(
            f"{fmt}: the blocks tensor (shape {tuple(blocks.shape)}, strides {blocks.stride()}) is not "
            "contiguous: a transposed or strided view of ggml blocks is not in ggml's byte order; pass "
            "the tensor quantize returned (or .contiguous() of a view whose logical order is ggml's)"
        )
    nbytes = get_format(fmt).bytes_per_block
    if blocks.dim() and blocks.numel() and blocks.shape[-1] % nbytes:
        raise ValueError(
            f"{fmt}: the blocks tensor has shape {tuple(blocks.shape)}, whose rows are not whole "
            f"{nbytes}-byte blocks; expected {tuple(expected)} (as quantize returns) or a flat buffer"
        )


# ------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("felix::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, fmt: str, backend: str) -> torch.Tensor:
    return implementation("quantize", backend)(x, fmt)


@_quantize_op.register_fake
def _(x, fmt, backend):
    f = get_format(fmt)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // f.block_size * f.bytes_per_block), dtype=torch.uint8)


@torch.library.custom_op("felix::dequantize", mutates_args=())
def _dequantize_op(
    blocks: torch.Tensor, fmt: str, shape: Sequence[int], dtype: torch.dtype, backend: str
) -> torch.Tensor:
    return implementation("dequantize", backend)(blocks, fmt, list(shape), dtype)


@_dequantize_op.register_fake
def _(blocks, fmt, shape, dtype, backend):
    return blocks.new_empty(tuple(shape), dtype=dtype)


# ------------------------------------------------------------------------------- public API
def quantize(x: torch.Tensor, fmt: str, backend: str | None = None) -> torch.Tensor:
    """Quantize `x` to ggml blocks of format `fmt`.

    The last dimension is split into blocks; the result is uint8 of shape
    ``[*x.shape[:-1], x.shape[-1] // block_size * bytes_per_block]`` holding ggml's exact bytes.
    `fmt` is one of ``"rq4", "iq4_nl", "q4_0", "q8_0", "tq2_0"``; `backend` one of
    ``"reference", "triton", "cpu"`` or None (automatic, see felix.ops.dispatch).
    """
    f = get_format(fmt)
    _check_quantize_input(x, f)
    chosen = resolve_backend("quantize", backend, x.device)
    if x.numel() == 0:  # nothing to encode: the empty blocks of the right shape, on every backend
        return torch.empty(block_shape(x.shape, f), dtype=torch.uint8, device=x.device)
    return _quantize_op(x.contiguous(), f.name, chosen)


def dequantize(
    blocks: torch.Tensor, fmt: str, shape: Sequence[int], dtype: torch.dtype = torch.float32, backend: str | None = None
) -> torch.Tensor:
    """Decode ggml blocks of format `fmt` into a tensor of `shape` and `dtype`."""
    f = get_format(fmt)
    shape = [int(s) for s in (shape if isinstance(shape, (list, tuple, torch.Size)) else [shape])]
    _check_dequantize_input(blocks, f, shape, dtype)
    chosen = resolve_backend("dequantize", backend, blocks.device)
    if math.prod(shape) == 0:  # nothing to decode: the empty tensor of the right shape, on every backend
        return torch.empty(shape, dtype=dtype, device=blocks.device)
    return _dequantize_op(blocks, f.name, shape, dtype, chosen)


# --------------------------------------------------------------------------------- backends
register_impl("quantize", "reference")(reference.quantize)
register_impl("dequantize", "reference")(reference.dequantize)


@register_impl("quantize", "triton")
def _quantize_triton(x, fmt):
    from felix.ops.kernels import codecs as kernels  # local: Triton is heavy and optional

    return kernels.quantize(x, fmt)


@register_impl("dequantize", "triton")
def _dequantize_triton(blocks, fmt, shape, dtype):
    from felix.ops.kernels import codecs as kernels  # local: Triton is heavy and optional

    return kernels.dequantize(blocks, fmt, shape, dtype)


def _codebook_array(f: QuantFormat):
    return f.codebook_tensor().numpy() if f.codebook is not None else _EMPTY_CODEBOOK.numpy()


_EMPTY_CODEBOOK = torch.zeros(0, dtype=torch.float32)


def _empty_cpu(shape, dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory numpy allocated: numpy asks Linux for transparent
    huge pages on large buffers, which cuts first-touch page faults (most of a large dequantize's time)."""
    return torch.from_numpy(np.empty(tuple(shape), dtype=torch.empty(0, dtype=dtype).numpy().dtype))


@register_impl("quantize", "cpu")
def _quantize_cpu(x, fmt):
    ext, _ = _ext.load()
    f = get_format(fmt)
    src = x.to(torch.float32).contiguous()
    out = _empty_cpu((*x.shape[:-1], x.shape[-1] // f.block_size * f.bytes_per_block), torch.uint8)
    ext.quantize(f.name, src.view(-1).numpy(), out.view(-1).numpy(), _codebook_array(f))
    return out


@register_impl("dequantize", "cpu")
def _dequantize_cpu(blocks, fmt, shape, dtype):
    ext, _ = _ext.load()
    f = get_format(fmt)
    out = _empty_cpu(shape, torch.float32)
    ext.dequantize(f.name, blocks.contiguous().view(-1).numpy(), out.view(-1).numpy(), _codebook_array(f))
    return out.to(dtype)
