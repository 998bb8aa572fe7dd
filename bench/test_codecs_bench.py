"""Codec benchmarks: Felix's C++ codecs against ggml's C quantizers (same thread count) and gguf-py
(numpy) on CPU; Felix's Triton codecs against the torch reference on a GPU.

Goals (reported, not asserted): C++ >= 1.0x ggml C and >= 20x gguf-py; Triton >= 70% of the
GPU's copy bandwidth.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch

import felix
from felix.core.formats import get_format
from felix.testing import ggml_c

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)

SHAPES = [(64, 512)] if QUICK else [(1024, 4096), (4096, 11008)]
FORMATS = list(felix.FORMATS)
THREADS = torch.get_num_threads()
CPU = torch.device("cpu")


def weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02


def traffic(shape, fmt, direction) -> float:
    n = shape[0] * shape[1]
    f = get_format(fmt)
    return n * 4 + n // f.block_size * f.bytes_per_block  # float32 one way, blocks the other


def case_name(direction, fmt, shape, where="cpu"):
    return f"{direction} {fmt} {shape[0]}x{shape[1]} {where}"


def ggml_threaded_quantize(x: np.ndarray, fmt: str, out: np.ndarray, pool: cf.ThreadPoolExecutor):
    """ggml_quantize_chunk over row chunks on THREADS threads (ctypes drops the GIL), as llama.cpp's
    quantizer runs it."""
    rows = x.shape[0]
    step = -(-rows // THREADS)
    list(pool.map(lambda r0: ggml_c.quantize(x, fmt, r0, min(step, rows - r0), out), range(0, rows, step)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("impl", ["felix-cpu", "ggml-c", "gguf-py", "felix-reference"])
def test_quantize_cpu(measure, impl, fmt, shape):
    x = weights(shape)
    case = case_name("quantize", fmt, shape)
    if impl == "felix-cpu":
        if not felix.backends()["cpu"].available:
            pytest.skip(felix.backends()["cpu"].reason)
        fn = lambda: felix.quantize(x, fmt, backend="cpu")  # noqa: E731
    elif impl == "felix-reference":
        if not QUICK and shape[0] * shape[1] > 8 << 20:
            pytest.skip("the torch reference is the spec, not a contender: timed on the small shape only")
        fn = lambda: felix.quantize(x, fmt, backend="reference")  # noqa: E731
    elif impl == "ggml-c":
        ok, why = ggml_c.available()
        if not ok or fmt == "rq4":
            pytest.skip(why or "stock ggml has no RQ4")
        xn = x.numpy()
        row_bytes = shape[1] // get_format(fmt).block_size * get_format(fmt).bytes_per_block
        pool = cf.ThreadPoolExecutor(THREADS)

        def fn():  # allocates its output each call, as felix.quantize does
            ggml_threaded_quantize(xn, fmt, np.empty((shape[0], row_bytes), dtype=np.uint8), pool)
    else:
        gq = pytest.importorskip("gguf.quants")
        from gguf.constants import GGMLQuantizationType

        if fmt in ("iq4_nl", "rq4"):
            pytest.skip(f"gguf-py cannot quantize {fmt}")
        xn, qt = x.numpy(), GGMLQuantizationType[get_format(fmt).ggml_name]
        fn = lambda: gq.quantize(xn, qt)  # noqa: E731
    measure(CPU, case, impl, fn, bytes_moved=traffic(shape, fmt, "q"), candidate=impl == "felix-cpu", rounds=3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("impl", ["felix-cpu", "ggml-c", "gguf-py"])
def test_dequantize_cpu(measure, impl, fmt, shape):
    x = weights(shape)
    blocks = felix.quantize(x, fmt)
    case = case_name("dequantize", fmt, shape)
    if impl == "felix-cpu":
        if not felix.backends()["cpu"].available:
            pytest.skip(felix.backends()["cpu"].reason)
        fn = lambda: felix.dequantize(blocks, fmt, shape, backend="cpu")  # noqa: E731
    elif impl == "ggml-c":
        ok, why = ggml_c.available()
        if not ok or fmt == "rq4":
            pytest.skip(why or "stock ggml has no RQ4")
        bn = blocks.numpy()
        pool = cf.ThreadPoolExecutor(THREADS)
        step = -(-shape[0] // THREADS)

        def fn():  # allocates its output each call, as felix.dequantize does
            out = np.empty(x.numel(), dtype=np.float32)
            list(
                pool.map(
                    lambda r0: ggml_c.dequantize(
                        bn[r0 : r0 + step],
                        fmt,
                        min(step, shape[0] - r0) * shape[1],
                        out[r0 * shape[1] : (r0 + step) * shape[1]],
                    ),
                    range(0, shape[0], step),
                )
            )
    else:
        gq = pytest.importorskip("gguf.quants")
        from gguf.constants import GGMLQuantizationType

        if fmt == "rq4":
            pytest.skip("gguf-py has no RQ4")
        bn, qt = blocks.numpy(), GGMLQuantizationType[get_format(fmt).ggml_name]
        fn = lambda: gq.dequantize(bn, qt)  # noqa: E731
    measure(CPU, case, impl, fn, bytes_moved=traffic(shape, fmt, "d"), candidate=impl == "felix-cpu", rounds=3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("direction", ["quantize", "dequantize"])
@pytest.mark.parametrize("impl", ["felix-triton", "torch-reference"])
def test_codecs_gpu(measure, gpu, impl, direction, fmt, shape):
    x = weights(shape).to(gpu)
    backend = "triton" if impl == "felix-triton" else "reference"
    if direction == "quantize":
        fn = lambda: felix.quantize(x, fmt, backend=backend)  # noqa: E731
    else:
        blocks = felix.quantize(x, fmt)
        fn = lambda: felix.dequantize(blocks, fmt, shape, backend=backend)  # noqa: E731
    measure(
        gpu,
        case_name(direction, fmt, shape, "gpu"),
        impl,
        fn,
        bytes_moved=traffic(shape, fmt, direction),
        candidate=impl == "felix-triton",
    )
