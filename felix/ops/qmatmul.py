"""Quantized matmul (W4A16): `felix.quant_matmul(x, blocks, fmt, out_features)` = x @ dequantize(W)^T with
W [out_features, K] kept as 4-bit ggml blocks (q4_0, iq4_nl, rq4) and decoded inside the kernel.

Declared once as the torch.library custom op ``felix::quant_matmul`` (backend name as an argument),
validated here, implemented by the ``reference`` (dequantize, then an fp32 matmul: the spec),
``triton`` (kernels/qmatmul.py, felix.ops.kernels.qmatmul) and ``hip`` (csrc/hip via felix._C_gpu, when built) backends.
The gradient with respect to x is x's gradient through the dequantized weight (so adapters can train
on top of a quantized base); the blocks get none.
"""

from __future__ import annotations

import torch

from felix.core.formats import get_format
from felix.ops import _gpu_ext
from felix.ops.codecs import block_shape, check_blocks_layout, dequantize
from felix.ops.dispatch import autocast_operands, implementation, register_impl, resolve_backend
from felix.ops.reference import qmatmul as reference
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS, four_bit_layout

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, blocks, fmt: str, out_features) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quant_matmul expects float32/float16/bfloat16 activations, got {got}")
    if x.dim() == 0:
        raise ValueError("quant_matmul expects activations with a last (input-feature) dimension, got a scalar")
    k = x.shape[-1]
    f = get_format(fmt)
    if k % f.block_size:
        raise ValueError(
            f"quant_matmul: the input-feature dimension K = x.shape[-1] = {k} must be a multiple "
            f"of {f.block_size} (the {fmt} block size); x has shape {tuple(x.shape)}"
        )
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"quant_matmul: out_features must be a non-negative int, got {out_features!r}")
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        got = blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"quant_matmul expects the weight as a uint8 tensor of ggml blocks, got {got}")
    need = out_features * (k // f.block_size) * f.bytes_per_block
    if blocks.numel() != need:
        raise ValueError(
            f"quant_matmul: a [{out_features}, {k}] {fmt} weight needs {need} bytes "
            f"({out_features} rows x {k // f.block_size} blocks x {f.bytes_per_block}), "
            f"the blocks tensor has {blocks.numel()} "
            f"(shape {tuple(blocks.shape)})"
        )
    if blocks.device != x.device:
        raise ValueError(f"quant_matmul: x is on {x.device} but the blocks are on {blocks.device}")
    check_blocks_layout(blocks, block_shape((out_features, k), f), fmt)


# ------------------------------------------------------------------------------- custom op
@torch.library.custom_op("felix::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, blocks: torch.Tensor, fmt: str, out_features: int, backend: str) -> torch.Tensor:
    return implementation("quant_matmul", backend)(x, blocks, fmt, out_features)


@_quant_matmul_op.register_fake
def _(x, blocks, fmt, out_features, backend):
    return x.new_empty((x.shape[0], out_features))


def _setup_context(ctx, inputs, output):
    _, blocks, fmt, out_features, _ = inputs
    ctx.save_for_backward(blocks)
    ctx.fmt, ctx.out_features = fmt, out_features


def _backward(ctx, grad):
    (blocks,) = ctx.saved_tensors
    f = get_format(ctx.fmt)
    k = blocks.numel() // f.bytes_per_block // max(ctx.out_features, 1) * f.block_size
    w = dequantize(blocks, ctx.fmt, [ctx.out_features, k], torch.float32)
    return (grad.to(torch.float32) @ w).to(grad.dtype), None, None, None, None


_quant_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- public API
def quant_matmul(
    x: torch.Tensor, blocks: torch.Tensor, fmt: str, out_features: int, backend: str | None = None
) -> torch.Tensor:
    """y = x @ dequantize(blocks, fmt, [out_features, K])^T, without materializing the weight.

    x: [..., K] float32/float16/bfloat16 with K a multiple of the block size; blocks: uint8 holding
    out_features x K/block blocks (as `felix.quantize(w, fmt)` returns for w [out_features, K]);
    fmt: one of QUANT_MATMUL_FORMATS (the 4-bit formats of felix/core/formats.py). Returns [..., out_features] in x's dtype (fp32 accumulation).
    backend: "reference", "triton", "hip" or None (automatic: Triton on GPU, the reference on CPU).
    """
    f = get_format(fmt)
    if f.name not in QUANT_MATMUL_FORMATS:
        raise ValueError(f"quant_matmul supports the 4-bit formats {', '.join(QUANT_MATMUL_FORMATS)}, not {f.name!r}")
    (x,) = autocast_operands(x)  # under autocast: activations in the autocast dtype, as F.linear (oplib)
    _check_inputs(x, blocks, f.name, out_features)
    chosen = resolve_backend("quant_matmul", backend, x.device)
    lead = x.shape[:-1]
    if x.numel() == 0 or out_features == 0:  # K = 0 sums nothing (zeros, as x @ w with K = 0); M or N = 0: empty
        weight_t = torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape[-1], out_features)
        return torch.matmul(x, weight_t)  # zeros [..., N] (no memory for the zero weight), with x's autograd
    y = _quant_matmul_op(x.reshape(-1, x.shape[-1]), blocks.reshape(-1), f.name, int(out_features), chosen)
    return y.reshape(*lead, out_features)


# --------------------------------------------------------------------------------- backends
register_impl("quant_matmul", "reference")(reference.quant_matmul)


@register_impl("quant_matmul", "triton")
def _quant_matmul_triton(x, blocks, fmt, out_features):
    from felix.ops.kernels import qmatmul as kernels  # local: Triton is heavy and optional

    return kernels.quant_matmul(x, blocks, fmt, out_features)


@register_impl("quant_matmul", "hip")
def _quant_matmul_hip(x, blocks, fmt, out_features):
    ext, _ = _gpu_ext.load()
    layout = four_bit_layout(fmt)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        return ext.quant_matmul(
            x.contiguous(),
            blocks.contiguous(),
            reference.decode_table(fmt, x.device),
            layout.pairs,
            out_features,
            stream,
        )
