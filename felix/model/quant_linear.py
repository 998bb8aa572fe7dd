"""`QuantLinear`: an nn.Linear whose weight stays in 4-bit ggml blocks (rq4 / iq4_nl / q4_0) and runs
through `felix.quant_matmul`, so a model can run quantized end to end without a dequantized copy of its
weights; and `quantize_model_linears`, which swaps a model's eligible Linears following the llama.cpp
fork's policy, the exporter's (felix.ops.quant_policy: 2-D weights with >= MIN_QUANT_ELEMENTS elements whose inner
dimension divides into the format's blocks; norms and embeddings stay as they are unless asked).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from felix.core.formats import get_format
from felix.ops.codecs import dequantize, quantize
from felix.ops.qmatmul import quant_matmul
from felix.ops.quant_policy import MIN_QUANT_ELEMENTS
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS

MIN_ELEMENTS = MIN_QUANT_ELEMENTS  # the fork (and the exporter) quantize 2-D tensors with at least this many elements
EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|token_embd|lm_head|output)($|\.)")
NORM_NAME = re.compile(r"norm", re.I)


class QuantLinear(nn.Module):
    """y = x @ dequantize(blocks)^T + bias, with `blocks` a uint8 buffer of ggml blocks [out, in/block*bytes]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "rq4",
        bias: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ):
        super().__init__()
        f = get_format(fmt)
        if f.name not in QUANT_MATMUL_FORMATS:
            raise ValueError(f"QuantLinear supports {', '.join(QUANT_MATMUL_FORMATS)}, not {f.name!r}")
        if in_features % f.block_size:
            raise ValueError(
                f"QuantLinear: in_features ({in_features}) must be a multiple of {f.block_size} "
                f"(the {f.name} block size)"
            )
        self.in_features, self.out_features, self.fmt, self.backend = in_features, out_features, f.name, backend
        self.register_buffer(
            "blocks",
            torch.zeros(
                out_features, in_features // f.block_size * f.bytes_per_block, dtype=torch.uint8, device=device
            ),
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "rq4", backend: str | None = None) -> "QuantLinear":
        """Quantize `linear.weight` to `fmt` (ggml's exact bytes, felix.quantize) and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        q = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            backend=backend,
        )
        q.blocks.copy_(quantize(w.to(torch.float32), fmt))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.fmt, [self.out_features, self.in_features], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.blocks, self.fmt, self.out_features, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
            f"bias={self.bias is not None}"
        )


def fork_policy(
    name: str, module: nn.Module, tied: bool, include_embeddings: bool = False, fmt: str = "rq4"
) -> str | None:
    """None if `module` (called `name`) should be quantized to `fmt`, else the reason it is kept: the exporter's
    rules (felix.ops.quant_policy) on nn.Linear modules, without its fallback types (QuantLinear holds `fmt` only)."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if NORM_NAME.search(name):
        return "a norm"
    if (tied or EMBEDDING_NAME.search(name)) and not include_embeddings:
        return "an embedding / output projection (kept unless include_embeddings=True)"
    if module.weight.numel() < MIN_ELEMENTS:
        return f"fewer than {MIN_ELEMENTS} weights"
    block = get_format(fmt).block_size
    if module.in_features % block:
        return f"in_features {module.in_features} is not a multiple of {block}"
    return None


def quantize_model_linears(
    model: nn.Module,
    fmt: str = "rq4",
    include_embeddings: bool = False,
    policy: Callable[[str, nn.Module, bool], str | None] | None = None,
    backend: str | None = None,
) -> dict[str, str]:
    """Replace `model`'s eligible nn.Linear modules by QuantLinear, in place.

    `policy(name, module, tied)` returns None to quantize or a reason to keep (default: :func:`fork_policy`;
    `tied` says the weight is shared with an nn.Embedding). Returns {name: "quantized" or the reason kept}
    for every nn.Linear in the model.
    """
    get_format(fmt)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decide = policy or (lambda n, m, t: fork_policy(n, m, t, include_embeddings, fmt))
    report: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        reason = decide(name, module, id(module.weight) in embedding_weights)
        if reason is not None:
            report[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module, fmt, backend=backend))
        report[name] = "quantized"
    return report
