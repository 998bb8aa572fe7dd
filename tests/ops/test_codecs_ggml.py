"""Byte-exactness against independent truths: ggml's C quantizers (libggml-base through ctypes),
gguf-py's dequantizers (RQ4, which stock ggml lacks, against the fork's C in tests/ship/test_fork_llamacpp.py).

Every backend is held to the same bytes: `reference` and `cpu` here, `triton` in an isolated
interpreter process (TRITON_INTERPRET=1).
"""

import numpy as np
import pytest
import torch

import felix
from felix.core.formats import FORMATS, RUNTIME_TYPES, get_format
from felix.testing import ggml_c

STOCK = list(RUNTIME_TYPES["stock"])
ALL = list(FORMATS)

ok, why = ggml_c.available()
needs_ggml = pytest.mark.skipif(not ok, reason=why)


def cpu_backends():
    return ["reference"] + (["cpu"] if felix.backends()["cpu"].available else [])


def awkward_matrix(gen: torch.Generator, rows: int, cols: int, fmt: str = "tq2_0") -> torch.Tensor:
    """Random rows at wildly different scales, with the block shapes that break codecs planted in.
    Values stay inside the range whose block scale fits fp16 for `fmt` (tq2_0's is the smallest)."""
    x = torch.randn(rows, cols, generator=gen) * torch.exp(4 * torch.randn(rows, 1, generator=gen))
    lim = get_format(fmt).max_abs_input / 2
    x = x.clamp(-lim, lim)
    blk = min(cols, 256)
    if rows > 0:
        x[0, :blk] = 0.0  # all-zero block
    if rows > 1:
        x[1, :blk] = 0.75  # constant block
    if rows > 2:
        x[2, :blk] = -0.0  # negative zeros
    if rows > 3:
        a = min(float(x[3, :32].abs().max()) * 2, lim)  # capped: 2 * float32(lim) can exceed the limit
        x[3, 5], x[3, 9] = -a, a  # tie for the largest |x|, negative first
    if rows > 4:
        x[4, :blk] = torch.randn(blk, generator=gen) * 1e-3
        x[4, 17] = 50.0  # single outlier
    if rows > 5:
        x[5, :blk] = torch.randn(blk, generator=gen) * 1e-39  # float32 subnormals
    return x


def random_shape(gen: torch.Generator, block: int) -> tuple:
    rows = int(torch.randint(1, 40, (1,), generator=gen))
    blocks_per_row = int(torch.randint(1, 9, (1,), generator=gen))
    return rows, blocks_per_row * block


@needs_ggml
@pytest.mark.parametrize("fmt", STOCK)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quantize_is_byte_exact_with_ggml(fmt, backend, gen):
    if backend not in cpu_backends():
        pytest.skip(felix.backends()[backend].reason)
    f = get_format(fmt)
    for _ in range(3):
        x = awkward_matrix(gen, *random_shape(gen, f.block_size), fmt)
        want = ggml_c.quantize(x.numpy(), fmt)
        got = felix.quantize(x, fmt, backend=backend).numpy()
        assert got.shape == want.shape
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"{fmt}/{backend}: {len(bad)} bytes differ, first at {bad[0].tolist()}"


@needs_ggml
@pytest.mark.parametrize("fmt", STOCK)
def test_quantize_large_matrix_cpu_vs_ggml(fmt, gen):
    """A realistic weight matrix (a million values), the C++ backend against ggml."""
    if "cpu" not in cpu_backends():
        pytest.skip(felix.backends()["cpu"].reason)
    x = torch.randn(256, 4096, generator=gen) * 0.02
    assert np.array_equal(felix.quantize(x, fmt, backend="cpu").numpy(), ggml_c.quantize(x.numpy(), fmt))


# ------------------------------------------------------------------------------------- RQ4
# RQ4 is not in stock ggml: its bytes are checked against the fork's own quantize_row_rq4_ref in
# tests/ship/test_fork_llamacpp.py. The all-zero convention, spelled out:
def test_rq4_all_zero_block_convention():
    """Felix follows the fork's C quantizer: d = 0 and index 7 everywhere (bytes 0x77);
    the fork's Python tool writes index 0. Both decode to exact zeros."""
    for backend in cpu_backends():
        b = felix.quantize(torch.zeros(1, 32), "rq4", backend=backend)
        assert b[0, :2].tolist() == [0, 0] and b[0, 2:].tolist() == [0x77] * 16
        python_tool = torch.tensor([[0, 0] + [0] * 16], dtype=torch.uint8)
        for blocks in (b, python_tool):
            assert torch.equal(felix.dequantize(blocks, "rq4", (1, 32), backend=backend).abs(), torch.zeros(1, 32))


def test_zero_block_conventions_of_stock_formats():
    """What ggml writes for an all-zero block (checked against ggml above, spelled out here)."""
    want = {
        "q8_0": [0, 0] + [0] * 32,
        "q4_0": [0x00, 0x80] + [0x88] * 16,  # d = -0.0: ggml divides the signed max 0 by -8
        "iq4_nl": [0, 0] + [0x88] * 16,  # index 8 (value +1) is nearest to 0
        "tq2_0": [0x55] * 64 + [0, 0],
    }  # q = 1 (value 0) in all four 2-bit lanes
    for fmt, expected in want.items():
        n = get_format(fmt).block_size
        for backend in cpu_backends():
            assert felix.quantize(torch.zeros(1, n), fmt, backend=backend)[0].tolist() == expected, (fmt, backend)


# ------------------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("fmt", STOCK)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dequantize_matches_gguf_py(fmt, backend, gen):
    if backend not in cpu_backends():
        pytest.skip(felix.backends()[backend].reason)
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf.constants import GGMLQuantizationType

    f = get_format(fmt)
    rows, cols = random_shape(gen, f.block_size)
    # Random bytes are valid blocks for every format (scales may be any finite fp16).
    raw = torch.randint(0, 256, (rows, cols // f.block_size * f.bytes_per_block), generator=gen, dtype=torch.uint8)
    scale_bytes = raw.view(rows, -1, f.bytes_per_block)[..., f.scale_offset + 1]
    scale_bytes &= 0xBB  # keep the fp16 exponent below inf/nan
    want = gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType[f.ggml_name])
    got = felix.dequantize(raw, fmt, (rows, cols), backend=backend).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_to_half_dtypes_rounds_the_float32_value(fmt, dtype, gen):
    f = get_format(fmt)
    x = torch.randn(3, 2 * f.block_size, generator=gen)
    b = felix.quantize(x, fmt, backend="reference")
    want = felix.dequantize(b, fmt, x.shape, backend="reference").to(dtype)
    for backend in cpu_backends():
        got = felix.dequantize(b, fmt, x.shape, dtype=dtype, backend=backend)
        assert got.dtype == dtype and torch.equal(got, want)
