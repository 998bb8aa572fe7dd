"""The fork's spoke residual as a fused op: ``felix.spoke_residual(h, norm_weight, w_down, w_up, gate_bias,
n_spokes, eps=1e-6, backend=None)``::

    y = h + sigmoid(gate_bias) * W_up · silu(W_down · rmsnorm(h, norm_weight)) / n_spokes

with W_down ``[S*r, d]`` and W_up ``[d, S*r]`` (the fork's ``w_down_fused`` / ``w_up_fused``: the S spokes side
by side), norm_weight ``[d]``, gate_bias ``[1]``. The spec and the backward's formulas:
felix/ops/reference/spoke.py. Declared as ``felix::spoke_fwd`` (returns y plus z = the pre-SiLU bottleneck and the
per-row reciprocal RMS, which the backward reuses) and ``felix::spoke_bwd``, joined by ``register_autograd``.
Backends: ``reference`` (torch, the spec) and ``triton`` (kernels/spoke.py: norm in the down-projection's
prologue, SiLU and the up-projection in registers, the gate and residual in its epilogue).

h's dtype is the compute dtype: W_down and W_up must have it (the model casts them, as autocast would);
norm_weight and gate_bias are read in fp32 and get gradients in their own dtype.
"""

from __future__ import annotations

import torch

from felix.ops.dispatch import implementation, register_impl, resolve_backend
from felix.ops.reference import spoke as ref
from felix.ops.reference.spoke import MAX_WIDTH

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("felix::spoke_fwd", mutates_args=())
def _spoke_fwd_op(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    gate_bias: torch.Tensor,
    n_spokes: int,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("spoke_fwd", backend)(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps)


@_spoke_fwd_op.register_fake
def _(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps, backend):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (
        torch.empty_like(h),
        h.new_empty(h.shape[0], w_down.shape[0], dtype=acc),
        h.new_empty(h.shape[0], dtype=acc),
    )


@torch.library.custom_op("felix::spoke_bwd", mutates_args=())
def _spoke_bwd_op(
    dy: torch.Tensor,
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    gate_bias: torch.Tensor,
    z: torch.Tensor,
    rs: torch.Tensor,
    n_spokes: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("spoke_bwd", backend)(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes)


@_spoke_bwd_op.register_fake
def _(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes, backend):
    return (
        torch.empty_like(h),
        torch.empty_like(norm_weight),
        torch.empty_like(w_down),
        torch.empty_like(w_up),
        torch.empty_like(gate_bias),
    )


def _setup_context(ctx, inputs, output):
    h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps, backend = inputs
    ctx.save_for_backward(h, norm_weight, w_down, w_up, gate_bias, output[1], output[2])
    ctx.n_spokes, ctx.backend = n_spokes, backend


def _backward(ctx, dy, dz_unused, drs_unused):
    h, norm_weight, w_down, w_up, gate_bias, z, rs = ctx.saved_tensors
    grads = _spoke_bwd_op(dy.contiguous(), h, norm_weight, w_down, w_up, gate_bias, z, rs, ctx.n_spokes, ctx.backend)
    return (*grads, None, None, None)


_spoke_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(h, norm_weight, w_down, w_up, gate_bias, n_spokes):
    for name, t in (
        ("h", h),
        ("norm_weight", norm_weight),
        ("w_down", w_down),
        ("w_up", w_up),
        ("gate_bias", gate_bias),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if (
        h.dim() < 1
        or h.shape[-1] != w_down.shape[-1]
        or w_down.dim() != 2
        or tuple(w_up.shape) != (h.shape[-1], w_down.shape[0])
    ):
        raise ValueError(
            f"spoke shapes do not fit: h {tuple(h.shape)}, w_down {tuple(w_down.shape)} "
            f"(expected [S*r, {h.shape[-1]}]), w_up {tuple(w_up.shape)} (expected "
            f"[{h.shape[-1]}, {w_down.shape[0] if w_down.dim() == 2 else 'S*r'}])"
        )
    if tuple(norm_weight.shape) != (h.shape[-1],):
        raise ValueError(f"norm_weight must be [{h.shape[-1]}], got {tuple(norm_weight.shape)}")
    if gate_bias.numel() != 1:
        raise ValueError(f"gate_bias must hold one value (the fork's [1] tensor), got shape {tuple(gate_bias.shape)}")
    if w_down.dtype != h.dtype or w_up.dtype != h.dtype:
        raise ValueError(f"w_down and w_up must have h's dtype {h.dtype}, got {w_down.dtype} and {w_up.dtype}")
    if not isinstance(n_spokes, int) or isinstance(n_spokes, bool) or n_spokes < 1 or w_down.shape[0] % n_spokes:
        raise ValueError(
            f"n_spokes must be a positive int dividing the bottleneck width {w_down.shape[0]}, got {n_spokes!r}"
        )
    devices = {t.device for t in (h, norm_weight, w_down, w_up, gate_bias)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def spoke_residual(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    gate_bias: torch.Tensor,
    n_spokes: int,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """``h + sigmoid(gate_bias) * W_up silu(W_down rmsnorm(h, norm_weight)) / n_spokes`` over the last dimension
    of h, fused (see the module docstring). Differentiable in h, norm_weight, w_down, w_up and gate_bias."""
    _check(h, norm_weight, w_down, w_up, gate_bias, n_spokes)
    chosen = resolve_backend("spoke_fwd", backend, h.device)
    if chosen == "triton" and w_down.shape[0] > MAX_WIDTH:
        raise ValueError(
            f"n_spokes * spoke_rank = {w_down.shape[0]} > {MAX_WIDTH}: the Triton spoke kernel holds "
            f"the bottleneck in one register tile; use backend='reference'"
        )
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    y, _, _ = _spoke_fwd_op(
        h2, norm_weight, w_down.contiguous(), w_up.contiguous(), gate_bias.reshape(1), int(n_spokes), float(eps), chosen
    )
    return y.reshape(h.shape)


register_impl("spoke_fwd", "reference")(ref.spoke_forward)
register_impl("spoke_bwd", "reference")(ref.spoke_backward)


@register_impl("spoke_fwd", "triton")
def _spoke_fwd_triton(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps):
    from felix.ops.kernels import spoke as kernels  # local: Triton is heavy and optional

    return kernels.forward(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps)


@register_impl("spoke_bwd", "triton")
def _spoke_bwd_triton(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes):
    from felix.ops.kernels import spoke as kernels  # local: Triton is heavy and optional

    return kernels.backward(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes)
