"""Which GGUF type each tensor of an export gets: the per-tensor quantization policy, one place.

The GGUF exporter (felix.ship.export) writes what this module chooses, and the RQ4 fidelity harness simulates
exactly the same choices on PyTorch weights, so "the quantized model" means one thing everywhere.

The rules, in order (like the fork's policy, docs/fork.md):

1. 1-D tensors (RMSNorm weights, splice gates) stay F32: llama.cpp wants F32 norms, and they are tiny.
2. SpliceCore tensors (``blk.N.splice.<proj>.a|b``) and the fork's spoke tensors (``blk.N.spoke.*``) stay F32:
   they are the runtime-edit surfaces, and an edit written into a 4-bit tensor would go through 4-bit rounding
   and mostly vanish.
3. Tensors under 1024 elements stay F32.
4. The embedding (``token_embd``, also the output head when tied) and ``output`` get `embedding_type`:
   Q8_0 by default when the chosen type is a 4-bit/ternary block format, else the chosen type.
5. Other 2-D tensors get the chosen type, if their rows (the last dimension, ggml's ne0) divide into its
   blocks; otherwise they fall back to Q8_0 (rows of a multiple of 32) or F16, and the reason says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from felix.core.formats import FORMATS, get_format
from felix.ops.codecs import dequantize, quantize
from felix.ops.reference.codecs import quantize_tq2_0_absmean

FLOAT_TYPES = ("f32", "f16", "bf16")
EXPORT_TYPES = FLOAT_TYPES + tuple(FORMATS)
MIN_QUANT_ELEMENTS = 1024
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")
_TORCH_FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# the quantizers a block type can be written with besides its own (ggml's): BitNet b1.58's absmean TQ2_0
# (felix.ops.reference.codecs.quantize_tq2_0_absmean), what a quantization-aware `bitnet` model ships as (felix.model.qat)
BITNET_CODEC = "bitnet"
ALTERNATIVE_CODECS = {("tq2_0", BITNET_CODEC): quantize_tq2_0_absmean}


@dataclass(frozen=True)
class TensorChoice:
    """The type a policy gives one tensor, and why."""

    name: str
    shape: tuple[int, ...]
    type: str  # one of EXPORT_TYPES
    reason: str
    fallback: bool = False  # True when the tensor wanted a block format whose block size its rows do not fit

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.type)


def check_type(name: str, what: str = "quantization type") -> str:
    t = str(name).lower()
    if t not in EXPORT_TYPES:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(EXPORT_TYPES)}")
    return t


def tensor_nbytes(shape, type_name: str) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    if type_name in FLOAT_TYPES:
        return numel * (4 if type_name == "f32" else 2)
    fmt = get_format(type_name)
    return numel // fmt.block_size * fmt.bytes_per_block


def default_embedding_type(quant: str) -> str:
    return "q8_0" if quant not in FLOAT_TYPES and quant != "q8_0" else quant


def choose_tensor_type(name: str, shape, quant: str, embedding_type: str | None = None) -> TensorChoice:
    """The GGUF type of tensor `name` of `shape` (PyTorch order: [out, in]) in an export to `quant`."""
    quant = check_type(quant)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) < 2:
        return TensorChoice(name, shape, "f32", "1-D (norm / gate): F32")
    if ".splice." in name or ".spoke." in name:
        return TensorChoice(name, shape, "f32", "splice / spoke tensor: runtime-edit surface stays F32")
    if numel < MIN_QUANT_ELEMENTS:
        return TensorChoice(name, shape, "f32", f"small ({numel} < {MIN_QUANT_ELEMENTS} elements): F32")
    want, why = quant, "chosen type"
    if name in EMBEDDING_TENSORS:
        want = check_type(embedding_type, "embedding type") if embedding_type else default_embedding_type(quant)
        why = "embedding / output head"
    if want in FLOAT_TYPES:
        return TensorChoice(name, shape, want, why)
    row = shape[-1]
    bs = FORMATS[want].block_size
    if row % bs == 0:
        return TensorChoice(name, shape, want, why)
    fb = "q8_0" if row % FORMATS["q8_0"].block_size == 0 else "f16"
    return TensorChoice(
        name, shape, fb, f"rows of {row} not divisible by {want}'s block of {bs}: {fb.upper()}", fallback=True
    )


def plan_tensor_types(named_shapes, quant: str, embedding_type: str | None = None) -> list[TensorChoice]:
    """choose_tensor_type for every (name, shape) in `named_shapes` (a dict or pairs), in order."""
    items = named_shapes.items() if hasattr(named_shapes, "items") else named_shapes
    return [choose_tensor_type(n, s, quant, embedding_type) for n, s in items]


def encode_tensor(
    t: torch.Tensor, type_name: str, backend: str | None = None, codec: str | None = None
) -> torch.Tensor:
    """`t` as stored under `type_name`: a float tensor for f32/f16/bf16, else uint8 ggml blocks (felix.quantize).
    `codec` picks another quantizer of the type (ALTERNATIVE_CODECS: ``"bitnet"`` for tq2_0); None or the type's
    own name is ggml's."""
    type_name = check_type(type_name)
    if type_name in FLOAT_TYPES:
        return t.detach().to(_TORCH_FLOAT[type_name]).contiguous()
    if codec is not None and codec != type_name:
        if (type_name, codec) not in ALTERNATIVE_CODECS:
            raise ValueError(
                f"no codec {codec!r} for {type_name}; its codecs: {type_name} (ggml's)"
                + "".join(f", {c}" for t, c in ALTERNATIVE_CODECS if t == type_name)
            )
        return ALTERNATIVE_CODECS[type_name, codec](t)
    return quantize(t.detach().float().contiguous(), type_name, backend=backend)


def decode_tensor(
    stored: torch.Tensor, type_name: str, shape, dtype=torch.float32, backend: str | None = None
) -> torch.Tensor:
    """Inverse of encode_tensor: the weights a runtime computes with, as `dtype`."""
    type_name = check_type(type_name)
    if type_name in FLOAT_TYPES:
        return stored.to(dtype).reshape(tuple(shape))
    return dequantize(stored, type_name, tuple(shape), dtype, backend=backend)


def roundtrip(t: torch.Tensor, type_name: str, backend: str | None = None) -> torch.Tensor:
    """`t` after storing it as `type_name` and reading it back (float32): the simulated-quantization weight."""
    return decode_tensor(encode_tensor(t, type_name, backend), type_name, t.shape, torch.float32, backend)
