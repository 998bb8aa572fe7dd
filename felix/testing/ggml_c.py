"""ggml's own C codecs, called through ctypes: the byte-exactness reference for stock formats.

llama-cpp-python ships libggml-base.so, which exports `ggml_quantize_chunk` (the C quantizers
llama.cpp itself uses when it writes a GGUF) and `dequantize_row_*`. RQ4 is not in stock ggml.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from felix.core.formats import get_format


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """Load libggml-base from the installed llama_cpp package (ImportError if it is missing)."""
    import llama_cpp  # noqa: F401  (local: optional, the test extra; the ImportError names the missing package)

    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(path):
        raise ImportError(f"llama_cpp is installed but {path} is missing")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def available() -> tuple[bool, str]:
    try:
        library()
    except (ImportError, OSError) as exc:
        return False, f"ggml C library not available: {exc}"
    return True, ""


def quantize(
    x: np.ndarray, fmt: str, start_row: int = 0, n_rows: int | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """ggml_quantize_chunk on a 2-D float32 array (rows of n_per_row); returns uint8 [rows, bytes]."""
    f = get_format(fmt)
    if f.name == "rq4":
        raise ValueError("stock ggml has no RQ4 (type 42); compare RQ4 with the reference algorithm")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n_per_row = x.shape
    row_bytes = n_per_row // f.block_size * f.bytes_per_block
    if out is None:
        out = np.empty((rows, row_bytes), dtype=np.uint8)
    n_rows = rows - start_row if n_rows is None else n_rows
    # `start` is an element offset (a multiple of n_per_row); ggml offsets src and dst itself.
    written = library().ggml_quantize_chunk(
        f.ggml_type, x.ctypes.data, out.ctypes.data, start_row * n_per_row, n_rows, n_per_row, None
    )
    if written != n_rows * row_bytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {n_rows * row_bytes}")
    return out


def dequantize(blocks: np.ndarray, fmt: str, n_values: int, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's `dequantize_row_<fmt>` over a whole uint8 buffer; returns float32 [n_values]."""
    f = get_format(fmt)
    if f.name == "rq4":
        raise ValueError("stock ggml has no RQ4 (type 42)")
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    if blocks.size != n_values // f.block_size * f.bytes_per_block:
        raise ValueError(f"{blocks.size} bytes do not hold {n_values} {fmt} values")
    out = np.empty(n_values, dtype=np.float32) if out is None else out
    fn = getattr(library(), f"dequantize_row_{f.name}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(blocks.ctypes.data, out.ctypes.data, n_values)
    return out
