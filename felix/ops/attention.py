"""Fused attention: `felix.attention(q, k, v, causal=True, scale=None, backend=None)`.

Declared as two torch.library custom ops, ``felix::attention_fwd`` (returns the output and the
log-sum-exp the backward needs) and ``felix::attention_bwd``, joined by
``torch.library.register_autograd``; implemented by the torch reference (felix/ops/reference/attention.py,
the spec) and the Triton kernels (kernels/attention.py).

Shapes: q ``[B, H, T_q, D]``, k and v ``[B, H_kv, T_k, D]`` with ``H % H_kv == 0`` (grouped-query
attention: q head h reads kv head ``h // (H // H_kv)``). Causal attention lets query i see keys
j <= i and needs T_q == T_k. head_dim D in (32, 64, 128). The output has q's dtype.
"""

from __future__ import annotations

import math

import torch

from felix.ops.dispatch import autocast_operands, implementation, register_impl, resolve_backend
from felix.ops.reference import attention as reference
from felix.ops.reference.attention import SUPPORTED_HEAD_DIMS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, causal, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention expects torch.Tensor inputs, {name} is {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention expects 4-D [batch, heads, seq, head_dim] tensors, {name} has shape {tuple(t.shape)}"
            )
        if t.dtype not in _DTYPES:
            raise ValueError(f"attention supports float16/bfloat16/float32/float64, {name} is {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, T_q, D = q.shape
    Bk, H_kv, T_k, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim differs: q has {D}, k/v have {Dk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head_dim {D}: supported head_dim values are {SUPPORTED_HEAD_DIMS}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the number of q heads ({H}) must be a multiple of the number of k/v heads ({H_kv})")
    if min(B, H, T_q, T_k) == 0:
        raise ValueError(f"empty attention: q shape {tuple(q.shape)}, k/v shape {tuple(k.shape)}")
    if causal and T_q != T_k:
        raise ValueError(f"causal attention needs as many queries as keys, got T_q={T_q}, T_k={T_k}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("felix::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("attention_fwd", backend)(q, k, v, causal, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("felix::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("attention_bwd", backend)(dout, q, k, v, out, lse, causal, scale)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- public API
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, fused (never materializing T x T on the Triton path).

    q ``[B, H, T_q, D]``, k/v ``[B, H_kv, T_k, D]``, ``H % H_kv == 0``; D in (32, 64, 128); fp16, bf16,
    fp32 (or fp64, for gradient checks) with fp32 accumulation; `scale` defaults to ``1/sqrt(D)``.
    Differentiable in q, k, v. `backend`: ``"reference"``, ``"triton"`` or None (automatic, see
    felix.ops.dispatch). Returns a tensor shaped and typed like q.
    """
    q, k, v = autocast_operands(q, k, v)  # under autocast: the autocast dtype, as SDPA (felix.ops.dispatch)
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, torch.Tensor):
        raise ValueError("scale must be a python number, not a tensor")
    _check_inputs(q, k, v, causal, scale)
    chosen = resolve_backend("attention_fwd", backend, q.device)
    out, _ = _attention_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), bool(causal), float(scale), chosen)
    return out


# ------------------------------------------------------------------------------------ backends
register_impl("attention_fwd", "reference")(reference.attention_forward)
register_impl("attention_bwd", "reference")(reference.attention_backward)


@register_impl("attention_fwd", "triton")
def _attention_fwd_triton(q, k, v, causal, scale):
    from felix.ops.kernels import attention as kernels  # local: Triton is heavy and optional

    return kernels.forward(q, k, v, causal, scale)


@register_impl("attention_bwd", "triton")
def _attention_bwd_triton(dout, q, k, v, out, lse, causal, scale):
    from felix.ops.kernels import attention as kernels  # local: Triton is heavy and optional

    return kernels.backward(dout, q, k, v, out, lse, causal, scale)
