"""Fused linear cross-entropy + QUAIL margin hinge: `felix.linear_ce_quail(...)` and `LinearCEQuail`.

Declared once as the torch.library custom op ``felix::linear_ce_quail``. Its forward returns the loss
parts *and* the gradients for h, W and b (computed chunk by chunk while the logits exist, never all at
once); ``register_autograd`` makes the backward a scaling of those stored gradients. Backends:
``reference`` (chunked torch, felix/ops/reference/loss.py: the CPU path) and ``triton`` (kernels/loss.py).
The spec every backend is tested against is ``felix.ops.reference.loss.full_logits_loss``.

Defaults: ``margin`` and ``lambda_q`` default to felix.core.quail.DEFAULT_MARGIN / DEFAULT_LAMBDA_Q, the one QUAIL
default the trainer, the fidelity harness and the README also use (the evidence for the values is next to
their definition).
"""

from __future__ import annotations

from typing import Sequence

import torch

from felix.ops.dispatch import autocast_operands, implementation, register_impl, resolve_backend
from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN, QuailConfig  # the one QUAIL default (re-exported)
from felix.ops.reference import loss as reference
from felix.ops.reference.loss import LossParts

# fp32 logits of one chunk on the torch path (CPU training): 64 MB keeps a 32K vocabulary at 512 rows
REFERENCE_CHUNK_LOGITS_BYTES = 64 << 20
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------- validation
def whitelist_mask(whitelist, vocab_size: int, device) -> torch.Tensor | None:
    """A bool mask [V] from a mask, or a list / tensor of token ids; None stays None."""
    if whitelist is None:
        return None
    if isinstance(whitelist, torch.Tensor) and whitelist.dtype == torch.bool:
        if whitelist.shape != (vocab_size,):
            raise ValueError(
                f"whitelist mask must have shape [{vocab_size}] (the vocabulary), got {tuple(whitelist.shape)}"
            )
        return whitelist.to(device)
    ids = torch.as_tensor(whitelist if not isinstance(whitelist, torch.Tensor) else whitelist.cpu())
    if ids.numel() and (ids.dtype.is_floating_point or ids.dim() != 1):
        raise ValueError(
            f"whitelist must be a bool mask [V] or a 1-D list of token ids, got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"whitelist token ids must lie in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]"
        )
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)


def _check_inputs(h, weight, targets, bias, ignore_index, chunk_size) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a 2-D [N, d] tensor, got {getattr(h, 'shape', type(h).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, d] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if h.dtype not in _FLOATS or weight.dtype != h.dtype:
        raise ValueError(f"h and weight must share a float dtype, got {h.dtype} and {weight.dtype}")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(
            f"hidden sizes differ: h is {tuple(h.shape)}, weight is {tuple(weight.shape)} "
            "(expected weight [V, d] for h [N, d])"
        )
    if h.shape[0] == 0 or weight.shape[0] == 0:
        raise ValueError(f"empty input: h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (h.shape[0],):
        raise ValueError(
            f"targets must be a [N] = [{h.shape[0]}] tensor, got {getattr(targets, 'shape', type(targets).__name__)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],) or bias.dtype != h.dtype
    ):
        raise ValueError(
            f"bias must be a [{weight.shape[0]}] tensor of dtype {h.dtype}, got "
            f"{getattr(bias, 'shape', None)} {getattr(bias, 'dtype', None)}"
        )
    if len({t.device for t in (h, weight, targets) + ((bias,) if bias is not None else ())}) > 1:
        raise ValueError("h, weight, targets (and bias) must be on one device")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if torch.compiler.is_compiling():
        return  # value checks need a host sync: eager callers get them
    _check_target_values(targets, weight.shape[0], ignore_index)


def _check_target_values(targets, vocab_size, ignore_index) -> None:
    """Targets in [0, V) or ignore_index. CPU targets: checked here, with the position named. Device targets:
    checked on the device, asynchronously (torch._assert_async), so a GPU training step never waits for it."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.device.type != "cpu":
        torch._assert_async(
            ~bad.any(),
            f"linear_ce_quail: a target is outside the vocabulary [0, {vocab_size}) "
            f"and is not the ignore_index {ignore_index}",
        )
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(targets[i])} at position {i} is outside the vocabulary [0, "
            f"{vocab_size}) and is not the ignore_index {ignore_index}"
        )


def default_chunk_size(n: int, v: int, backend: str, device: torch.device) -> int:
    """Tokens per chunk so one chunk's fp32 logits stay within the backend's budget (>= 16 rows)."""
    if backend == "triton":  # the kernels' per-arch budgets, as data
        from felix.ops.kernels.loss import default_chunk_size as triton_default  # local: Triton is optional

        return triton_default(n, v, device)
    return max(16, min(n, REFERENCE_CHUNK_LOGITS_BYTES // (4 * v)))


# ---------------------------------------------------------------------------------- custom op
@torch.library.custom_op("felix::linear_ce_quail", mutates_args=())
def _linear_ce_quail_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    whitelist: torch.Tensor | None,
    bias: torch.Tensor | None,
    margin: float,
    lambda_q: float,
    z_loss: float,
    ignore_index: int,
    chunk_size: int,
    accum_dtype: torch.dtype,
    need_grads: bool,
    backend: str,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(parts [6], per-token rows [4, N], dh, dW, db). The gradients are for grad_output 1 (mean / sum) or
    for `row_weight` (a "none" loss's incoming gradient, given by the backward's second call)."""
    parts, dh, dw, db, rows = implementation("linear_ce_quail", backend)(
        h,
        weight,
        targets,
        whitelist,
        bias,
        margin,
        lambda_q,
        z_loss,
        ignore_index,
        chunk_size,
        accum_dtype,
        need_grads,
        reduction,
        label_smoothing,
        softcap,
        row_weight,
    )
    return parts, rows, dh, dw, db


@_linear_ce_quail_op.register_fake
def _(
    h,
    weight,
    targets,
    whitelist,
    bias,
    margin,
    lambda_q,
    z_loss,
    ignore_index,
    chunk_size,
    accum_dtype,
    need_grads,
    backend,
    reduction="mean",
    label_smoothing=0.0,
    softcap=0.0,
    row_weight=None,
):
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    parts, rows = h.new_empty(6, dtype=dt), h.new_empty((4, h.shape[0]), dtype=dt)
    if not need_grads:
        return parts, rows, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return parts, rows, torch.empty_like(h), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    _, _, dh, dw, db = output
    ctx.has_bias = inputs[4] is not None
    ctx.reduction = inputs[13] if len(inputs) > 13 else "mean"
    if ctx.reduction == "none":  # per-row gradients: the backward recomputes with the incoming weights
        ctx.inputs = inputs
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4])
    else:
        ctx.save_for_backward(dh, dw, db)


def _backward(ctx, g_parts, g_rows, g_dh, g_dw, g_db):
    nones = (None,) * 13
    if ctx.reduction == "none":
        h, weight, targets, whitelist, bias = ctx.saved_tensors
        (
            _,
            _,
            _,
            _,
            _,
            margin,
            lambda_q,
            z_loss,
            ignore_index,
            chunk_size,
            accum_dtype,
            _,
            backend,
            _,
            label_smoothing,
            softcap,
        ) = ctx.inputs[:16]
        _, _, dh, dw, db = _linear_ce_quail_op(
            h,
            weight,
            targets,
            whitelist,
            bias,
            margin,
            lambda_q,
            z_loss,
            ignore_index,
            chunk_size,
            accum_dtype,
            True,
            backend,
            "none",
            label_smoothing,
            softcap,
            g_rows[0].contiguous(),
        )
        return (dh, dw, None, None, db if ctx.has_bias else None, *nones[:8], None, None, None, None)
    dh, dw, db = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError(
            "linear_ce_quail was run without gradients (no input required grad): nothing to backpropagate"
        )
    g = g_parts[0]
    scale = lambda t: (t * g).to(t.dtype)  # noqa: E731 - grad_output is a 0-d tensor
    return (scale(dh), scale(dw), None, None, scale(db) if ctx.has_bias else None, *nones[:8], None, None, None, None)


_linear_ce_quail_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- public API
def linear_ce_quail(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    whitelist: torch.Tensor | Sequence[int] | None = None,
    margin: float = DEFAULT_MARGIN,
    lambda_q: float = DEFAULT_LAMBDA_Q,
    z_loss: float = 0.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
    accum_dtype: torch.dtype = torch.float32,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> LossParts:
    """Cross-entropy + lambda_q * QUAIL margin hinge (+ z-loss) of logits h Wᵀ + b, without the N x V logits.

    h ``[N, d]``, weight ``[V, d]`` (same float dtype), targets ``[N]`` int ids (``ignore_index`` skips a
    position), whitelist: bool mask ``[V]`` or token ids whose target positions must keep a margin of
    ``margin`` nats over the best other token (see felix/ops/reference/loss.py for the exact definition).
    The options peers offer (Liger-Kernel's fused linear cross-entropy): ``reduction`` "mean" | "sum" |
    "none" (per-token ``[N]`` losses, 0 at ignored positions), ``label_smoothing`` in [0, 1], ``softcap``
    (logits -> softcap * tanh(logits / softcap); None or 0: off).
    ``chunk_size``: tokens per chunk (default: the device's logits budget, kernels/loss.py);
    ``accum_dtype``: dtype dW and db accumulate in across chunks (fp32). Returns
    ``LossParts(loss, ce, hinge, z_loss, active_hinge_count, mean_margin)``; only ``loss`` is differentiable
    (in h, weight and bias). Under autocast, h, W and b are taken in the autocast dtype; logits stay fp32.
    """
    # under autocast: h, W, b in the autocast dtype, as F.linear would take them; the logits stay fp32 (oplib)
    h, weight, bias = autocast_operands(h, weight, bias)
    _check_inputs(h, weight, targets, bias, ignore_index, chunk_size)
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(reference.REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not float(softcap) >= 0.0:
        raise ValueError(f"softcap must be a positive number (or None / 0: off), got {softcap}")
    mask = whitelist_mask(whitelist, weight.shape[0], h.device)
    if accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype}")
    chosen = resolve_backend("linear_ce_quail", backend, h.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], weight.shape[0], chosen, h.device)
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    parts, rows, _, _, _ = _linear_ce_quail_op(
        h.contiguous(),
        weight.contiguous(),
        targets,
        mask,
        bias.contiguous() if bias is not None else None,
        float(margin),
        float(lambda_q),
        float(z_loss),
        int(ignore_index),
        int(chunk_size),
        accum_dtype,
        bool(need) and reduction != "none",
        chosen,
        reduction,
        float(label_smoothing),
        float(softcap or 0.0),
        None,
    )
    d = parts.detach()
    if reduction == "none":
        r = rows.detach()
        return LossParts(rows[0], r[1], r[2], r[3], d[4].round().long(), d[5])
    return LossParts(parts[0], d[1], d[2], d[3], d[4].round().long(), d[5])


class LinearCEQuail(torch.nn.Module):
    """The training loss as a module: holds the whitelist and hyper-parameters, takes (h, weight, targets)."""

    def __init__(
        self,
        whitelist: torch.Tensor | None = None,
        margin: float = DEFAULT_MARGIN,
        lambda_q: float = DEFAULT_LAMBDA_Q,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        backend: str | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        self.register_buffer("whitelist", whitelist.bool() if whitelist is not None else None, persistent=False)
        self.margin, self.lambda_q, self.z_loss = margin, lambda_q, z_loss
        self.ignore_index, self.chunk_size, self.backend = ignore_index, chunk_size, backend
        self.reduction, self.label_smoothing, self.softcap = reduction, label_smoothing, softcap

    @classmethod
    def from_config(cls, config: QuailConfig, whitelist: torch.Tensor | None = None, **options) -> LinearCEQuail:
        """The loss with margin and lambda_q from a QUAIL config object (felix.core.quail.QuailConfig, e.g. a
        TrainConfig's ``.quail`` or a calibrated one); `options` as for the constructor."""
        return cls(whitelist, config.margin, config.lambda_q, **options)

    def forward(self, h, weight, targets, bias=None) -> LossParts:
        return linear_ce_quail(
            h,
            weight,
            targets,
            self.whitelist,
            self.margin,
            self.lambda_q,
            self.z_loss,
            bias,
            self.ignore_index,
            self.chunk_size,
            self.backend,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        n = int(self.whitelist.sum()) if self.whitelist is not None else 0
        return f"margin={self.margin}, lambda_q={self.lambda_q}, z_loss={self.z_loss}, whitelisted={n}"


# ------------------------------------------------------------------------------------ backends
register_impl("linear_ce_quail", "reference")(reference.chunked_loss_and_grads)


@register_impl("linear_ce_quail", "triton")
def _linear_ce_quail_triton(*args):
    from felix.ops.kernels import loss as kernels  # local: Triton is heavy and optional

    return kernels.loss_and_grads(*args)
