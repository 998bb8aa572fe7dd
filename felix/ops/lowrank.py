"""SpliceCore low-rank add: `felix.lowrank_linear(x, weight, a, b, gate, bias=None, backend=None)`.

    y = x Wᵀ + bias + Σ_t gate_t ⊙ ((x A_tᵀ) B_tᵀ)

with W ``[out, in]``, A_t ``[r_t, in]``, B_t ``[out, r_t]``, total rank Σ r_t <= 64, gate_t a scalar or a
per-output ``[out]`` vector. Several terms (the model's splice plus a task adapter) are concatenated along
r into one fused product. Gates are folded into B (``B_eff = gate ⊙ B``, an r-sized tensor) by plain
differentiable torch, so the fused op only sees ``(x, W, bias, A_cat, B_eff)`` and autograd carries dgate
and dB back through the fold.

Declared as ``felix::lowrank_fwd`` (returns y and U = x A_catᵀ, which the backward reuses) and
``felix::lowrank_bwd``, joined by ``register_autograd``. dW is computed only when W requires grad (a
frozen base weight costs no weight-gradient GEMM). Backends: ``reference`` (torch, the spec) and
``triton`` (kernels/lowrank.py: the low-rank term fused into the main GEMM's epilogue).
"""

from __future__ import annotations

import torch

from felix.ops.dispatch import autocast_operands, implementation, register_impl, resolve_backend
from felix.ops.reference.lowrank import MAX_RANK, reference_backward, reference_forward

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("felix::lowrank_fwd", mutates_args=())
def _lowrank_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("lowrank_fwd", backend)(x, weight, bias, a, b)


@_lowrank_fwd_op.register_fake
def _(x, weight, bias, a, b, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("felix::lowrank_bwd", mutates_args=())
def _lowrank_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    need_weight_grad: bool,
    has_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("lowrank_bwd", backend)(dy, x, weight, a, b, u, need_weight_grad, has_bias)


@_lowrank_bwd_op.register_fake
def _(dy, x, weight, a, b, u, need_weight_grad, has_bias, backend):
    dw = torch.empty_like(weight) if need_weight_grad else x.new_empty(0)
    dbias = dy.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return torch.empty_like(x), dw, dbias, torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, backend = inputs
    ctx.save_for_backward(x, weight, a, b, output[1])
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, dy, du):
    x, weight, a, b, u = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1]
    dx, dw, dbias, da, db = _lowrank_bwd_op(dy.contiguous(), x, weight, a, b, u, need_w, ctx.has_bias, ctx.backend)
    return dx, (dw if need_w else None), (dbias if ctx.has_bias else None), da, db, None


_lowrank_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------- validation
def _as_list(t, name):
    if isinstance(t, torch.Tensor):
        return [t]
    if isinstance(t, (list, tuple)) and t and all(isinstance(e, torch.Tensor) for e in t):
        return list(t)
    raise ValueError(f"{name} must be a tensor or a non-empty list of tensors, got {type(t).__name__}")


def _check(x, weight, a_list, b_list, gates, bias):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., in], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {getattr(weight, 'shape', type(weight).__name__)}")
    out_f, in_f = weight.shape
    if x.dtype not in _FLOATS or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} input features, weight {tuple(weight.shape)} expects {in_f}")
    if len(a_list) != len(b_list):
        raise ValueError(f"{len(a_list)} A tensors but {len(b_list)} B tensors: give one A and one B per term")
    total = 0
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 2 or a.shape[1] != in_f:
            raise ValueError(f"a[{i}] must be [r, {in_f}], got {tuple(a.shape)}")
        if b.dim() != 2 or b.shape != (out_f, a.shape[0]):
            raise ValueError(f"b[{i}] must be [{out_f}, {a.shape[0]}] (out x r of a[{i}]), got {tuple(b.shape)}")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise ValueError(f"a[{i}] and b[{i}] must have x's dtype {x.dtype}, got {a.dtype} and {b.dtype}")
        total += a.shape[0]
    if total == 0 or total > MAX_RANK:
        raise ValueError(f"total rank of the low-rank terms must be in [1, {MAX_RANK}], got {total}")
    for i, g in enumerate(gates):
        if isinstance(g, (int, float)):
            continue
        if not isinstance(g, torch.Tensor) or g.numel() not in (1, out_f) or g.dim() > 1:
            raise ValueError(
                f"gate[{i}] must be a number, a 1-element tensor or a [{out_f}] per-output tensor, "
                f"got {getattr(g, 'shape', type(g).__name__)}"
            )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_f,) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias must be a [{out_f}] tensor of dtype {x.dtype}, got "
            f"{getattr(bias, 'shape', None)} {getattr(bias, 'dtype', None)}"
        )
    devices = {t.device for t in [x, weight, *a_list, *b_list] + ([bias] if bias is not None else [])}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------- public API
def lowrank_linear(
    x: torch.Tensor, weight: torch.Tensor, a, b, gate=1.0, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """y = x Wᵀ + bias + Σ_t gate_t ⊙ (x A_tᵀ) B_tᵀ, fused (see the module docstring).

    `a`, `b`: tensors, or lists of tensors for several terms; `gate`: a number, a 1-element tensor or a
    per-output ``[out]`` tensor — one shared by all terms, or a list with one per term. Differentiable in
    x, weight (only computed when it requires grad), bias, a, b and gate."""
    a_list, b_list = _as_list(a, "a"), _as_list(b, "b")
    x, weight, bias, a_list, b_list = autocast_operands(x, weight, bias, a_list, b_list)  # as F.linear (oplib)
    gates = list(gate) if isinstance(gate, (list, tuple)) else [gate] * len(a_list)
    if len(gates) != len(a_list):
        raise ValueError(f"{len(gates)} gates for {len(a_list)} low-rank terms: give one per term or one shared")
    _check(x, weight, a_list, b_list, gates, bias)
    chosen = resolve_backend("lowrank_fwd", backend, x.device)
    out_f = weight.shape[0]
    b_eff = torch.cat(
        [
            (g.reshape(-1, 1) * bt if isinstance(g, torch.Tensor) else g * bt).to(x.dtype)
            for g, bt in zip(gates, b_list)
        ],
        dim=1,
    )
    a_cat = torch.cat(a_list, dim=0) if len(a_list) > 1 else a_list[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y, _ = _lowrank_fwd_op(x2, weight.contiguous(), bias, a_cat.contiguous(), b_eff.contiguous(), chosen)
    return y.reshape(*x.shape[:-1], out_f)


# ------------------------------------------------------------------------------------ backends
register_impl("lowrank_fwd", "reference")(reference_forward)
register_impl("lowrank_bwd", "reference")(reference_backward)


@register_impl("lowrank_fwd", "triton")
def _lowrank_fwd_triton(x, weight, bias, a, b):
    from felix.ops.kernels import lowrank as kernels  # local: Triton is heavy and optional

    return kernels.forward(x, weight, bias, a, b)


@register_impl("lowrank_bwd", "triton")
def _lowrank_bwd_triton(dy, x, weight, a, b, u, need_weight_grad, has_bias):
    from felix.ops.kernels import lowrank as kernels  # local: Triton is heavy and optional

    return kernels.backward(dy, x, weight, a, b, u, need_weight_grad, has_bias)
