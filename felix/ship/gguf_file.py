"""GGUF files with Felix's extra ggml types, on top of gguf-py's writer and reader.

gguf-py knows every stock ggml type but not the fork's RQ4 (ggml type 42, docs/fork.md). Rather than patch
gguf-py's enums and size tables at import time (which would change gguf-py for every other user in the
process), :class:`FelixGGUFWriter` and :class:`FelixGGUFReader` subclass gguf-py's and handle the types
gguf-py does not know from Felix's format table (:data:`felix.core.formats.FORMATS`), the single source of truth
for block sizes. Everything else -- header, metadata, alignment, tensor data layout -- is gguf-py's code.

:func:`open_gguf` opens any GGUF (ours or not) with a clear error for a missing, truncated or non-GGUF file;
:func:`tensor_to_torch` turns a stored tensor into float32 weights in PyTorch order (``[out, in]``), decoding
Felix's formats with Felix's codecs and other quantized types with gguf-py's numpy dequantizers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from gguf.gguf_reader import ReaderTensor

from felix.core.formats import FORMATS, get_format
from felix.ops.codecs import dequantize

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file cannot be read: missing, truncated, not GGUF, or holding a type nobody here knows."""


class ExtensionType(int):
    """A ggml type id gguf-py does not know (e.g. RQ4 = 42), with a ``.name`` like gguf-py's enum members."""

    def __new__(cls, value: int, name: str):
        obj = super().__new__(cls, value)
        obj._name = name
        return obj

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<ExtensionType.{self._name}: {int(self)}>"


_GGUF_KNOWN = {int(t) for t in GGMLQuantizationType}
# Felix formats that gguf-py has no entry for: today only RQ4 (42). Derived, not listed, so a format added to
# felix.core.formats that gguf-py lacks is handled automatically.
EXTENSION_TYPES: dict[int, ExtensionType] = {
    f.ggml_type: ExtensionType(f.ggml_type, f.ggml_name) for f in FORMATS.values() if f.ggml_type not in _GGUF_KNOWN
}
_FORMAT_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
# Felix's export type name -> ggml type id (float types from gguf-py, block formats from felix.core.formats)
GGML_TYPE_IDS: dict[str, int] = {
    "f32": int(GGMLQuantizationType.F32),
    "f16": int(GGMLQuantizationType.F16),
    "bf16": int(GGMLQuantizationType.BF16),
    **{name: f.ggml_type for name, f in FORMATS.items()},
}


def ggml_type(type_name: str) -> GGMLQuantizationType | ExtensionType:
    """The ggml type object (gguf-py's enum member, or an ExtensionType) for a Felix export type name."""
    tid = GGML_TYPE_IDS.get(str(type_name).lower())
    if tid is None:
        raise ValueError(f"unknown tensor type {type_name!r}; known: {', '.join(GGML_TYPE_IDS)}")
    return EXTENSION_TYPES.get(tid) or GGMLQuantizationType(tid)


def type_name(tensor_type) -> str:
    """Display name of a stored tensor's ggml type (``F32``, ``Q4_0``, ``RQ4``, ``Q4_K`` ...)."""
    return tensor_type.name


def block_geometry(tensor_type) -> tuple[int, int]:
    """(elements per block, bytes per block) of any ggml type known to gguf-py or Felix."""
    t = int(tensor_type)
    if t in EXTENSION_TYPES:
        f = _FORMAT_BY_GGML_TYPE[t]
        return f.block_size, f.bytes_per_block
    return GGML_QUANT_SIZES[GGMLQuantizationType(t)]


class FelixGGUFWriter(GGUFWriter):
    """gguf-py's GGUFWriter that also accepts Felix's extension types (RQ4) as ``raw_dtype``.

    For a uint8 block tensor gguf-py converts the byte shape to an element shape with its own size table; for
    an extension type we do that conversion from felix.core.formats and hand gguf-py the element shape."""

    def add_tensor_info(self, name, tensor_shape, tensor_dtype, tensor_nbytes, raw_dtype=None) -> None:
        if raw_dtype is not None and int(raw_dtype) in EXTENSION_TYPES:
            block, nbytes = block_geometry(raw_dtype)
            if tensor_dtype != np.uint8 or tensor_shape[-1] % nbytes:
                raise ValueError(
                    f"{name}: {raw_dtype.name} data must be uint8 rows of whole {nbytes}-byte blocks, "
                    f"got {np.dtype(tensor_dtype)} of shape {tuple(tensor_shape)}"
                )
            element_shape = [*tensor_shape[:-1], tensor_shape[-1] // nbytes * block]
            # a non-uint8 dtype tells gguf-py the shape is already in elements
            return super().add_tensor_info(
                name, element_shape, np.dtype(np.float32), tensor_nbytes, raw_dtype=EXTENSION_TYPES[int(raw_dtype)]
            )
        return super().add_tensor_info(name, tensor_shape, tensor_dtype, tensor_nbytes, raw_dtype=raw_dtype)

    def add_stored_tensor(self, name: str, stored: torch.Tensor, type_name: str) -> None:
        """Add a tensor as Felix stores it (felix.ops.quant_policy.encode_tensor): a float tensor for f32/f16/bf16,
        uint8 ggml blocks (rows x bytes) for a block format."""
        t = str(type_name).lower()
        if t == "bf16":  # numpy has no bfloat16: hand gguf-py the raw 16-bit words
            data = stored.contiguous().view(torch.int16).numpy().view(np.uint16)
            return self.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.BF16)
        if t in ("f32", "f16"):
            return self.add_tensor(name, stored.contiguous().numpy())
        return self.add_tensor(name, stored.contiguous().numpy(), raw_dtype=ggml_type(t))


class FelixGGUFReader(GGUFReader):
    """gguf-py's GGUFReader that also reads tensors of Felix's extension types (RQ4) instead of failing."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        unknown = [f for f in fields if int(f.parts[4][0]) not in _GGUF_KNOWN]
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) in _GGUF_KNOWN])
        if not unknown:
            return
        built = {t.name: t for t in self.tensors}
        for field in unknown:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            tid = int(raw_dtype[0])
            if tid not in EXTENSION_TYPES:
                raise GGUFError(f"tensor {name!r} has ggml type {tid}, which neither gguf-py nor Felix knows")
            if name in built:
                raise GGUFError(f"duplicated tensor name {name!r}")
            block, nbytes = block_geometry(tid)
            n_elems = int(np.prod(dims))
            n_bytes = n_elems // block * nbytes
            byte_shape = (*reversed(dims.tolist()[1:]), int(dims[0]) // block * nbytes)
            data_offs = int(start_offs + offset_tensor[0])
            built[name] = ReaderTensor(
                name=name,
                tensor_type=EXTENSION_TYPES[tid],
                shape=dims,
                n_elements=n_elems,
                n_bytes=n_bytes,
                data_offset=data_offs,
                data=self._get(data_offs, np.uint8, n_bytes).reshape(byte_shape),
                field=field,
            )
        order = [str(bytes(f.parts[1]), encoding="utf-8") for f in fields]
        self.tensors = [built[n] for n in order]


def open_gguf(path) -> FelixGGUFReader:
    """Open a GGUF file for reading (memory-mapped), with a clear error when it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return FelixGGUFReader(path)
    except GGUFError:
        raise
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path} holds a key or tensor name that is not UTF-8 ({e})") from e
    except (ValueError, IndexError, OSError, KeyError, OverflowError) as e:
        raise GGUFError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from e


def torch_shape(t: ReaderTensor) -> tuple[int, ...]:
    """A stored tensor's shape in PyTorch order (ggml's ne0 -- the row length -- last)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def tensor_to_torch(t: ReaderTensor) -> torch.Tensor:
    """A stored tensor's values as float32 in PyTorch order: Felix's formats through Felix's codecs, other
    quantized types through gguf-py's numpy dequantizers."""
    shape = torch_shape(t)
    tid = int(t.tensor_type)
    if tid in _FORMAT_BY_GGML_TYPE:
        fmt = get_format(_FORMAT_BY_GGML_TYPE[tid].name)
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        return dequantize(blocks.reshape(*shape[:-1], -1), fmt.name, shape, torch.float32)
    if tid == int(GGMLQuantizationType.BF16):
        words = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16).copy())
        return words.view(torch.bfloat16).float().reshape(shape)
    if tid in (int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16), int(GGMLQuantizationType.F64)):
        return torch.from_numpy(np.asarray(t.data, dtype=np.float32).copy()).reshape(shape)
    return torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)


def metadata(reader: GGUFReader, path=None) -> dict:
    """Every key/value of a GGUF as plain Python values (arrays as lists), minus gguf-py's header fields. A string
    that is not UTF-8 (gguf-py decodes them lazily) raises GGUFError naming the file and the key."""
    path = path if path is not None else getattr(reader.data, "filename", "the GGUF file")
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except UnicodeDecodeError as e:
            raise GGUFError(f"{path}: metadata {key} holds text that is not UTF-8 ({e})") from e
        except (ValueError, IndexError) as e:
            raise GGUFError(f"{path}: metadata {key} is corrupt ({type(e).__name__}: {e})") from e
    return out


def remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
