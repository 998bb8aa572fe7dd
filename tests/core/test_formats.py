"""The format table is the single source of truth: check it against gguf-py and the C++ extension."""

import pytest
import torch

import felix
from felix.ops import _ext
from felix.core.formats import (
    FILE_TYPES,
    FORMATS,
    IQ4_NL_VALUES,
    LARGEST_BLOCK,
    RQ4_CODEBOOK,
    RUNTIME_TYPES,
    formats_with_packing,
    get_format,
)


def test_table_matches_gguf_py():
    pytest.importorskip("gguf")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for f in FORMATS.values():
        if f.runtime == "fork":
            continue  # RQ4 (type 42) exists only in the Felix llama.cpp fork
        t = GGMLQuantizationType[f.ggml_name]
        assert int(t) == f.ggml_type
        assert GGML_QUANT_SIZES[t] == (f.block_size, f.bytes_per_block)


def test_file_types_match_gguf_py():
    """Each stock format's llama_ftype is gguf-py's LlamaFileType.MOSTLY_<NAME>; the float types' too."""
    pytest.importorskip("gguf")
    from gguf.constants import LlamaFileType

    for f in FORMATS.values():
        if f.runtime == "fork":
            assert f.llama_file_type is None and f.name not in FILE_TYPES  # the fork's ftype is not public
            continue
        assert f.llama_file_type == int(LlamaFileType[f"MOSTLY_{f.ggml_name}"]) == FILE_TYPES[f.name]
    assert [FILE_TYPES[t] for t in ("f32", "f16", "bf16")] == [
        int(LlamaFileType.ALL_F32),
        int(LlamaFileType.MOSTLY_F16),
        int(LlamaFileType.MOSTLY_BF16),
    ]


def test_derived_lists_follow_the_table():
    assert RUNTIME_TYPES["stock"] == ("q8_0", "q4_0", "iq4_nl", "tq2_0") and set(RUNTIME_TYPES["fork"]) == set(FORMATS)
    assert formats_with_packing("halves", "pairs") == ("q4_0", "iq4_nl", "rq4")
    assert LARGEST_BLOCK == 256


def test_scale_and_index_bytes_are_where_gguf_py_reads_them():
    """Decode with gguf-py's own dequantizers blocks whose bytes are set through the table's slices: a block of
    scale 1 whose every index byte is the same value decodes to the values gguf-py's layout implies."""
    pytest.importorskip("gguf")
    import numpy as np
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    for f in FORMATS.values():
        if f.runtime == "fork":
            continue
        block = torch.zeros(1, f.bytes_per_block, dtype=torch.uint8)
        block[0, f.scale_slice] = one
        block[0, f.qs_slice] = 0x01  # index 1 in the low bits of every byte (q8_0: the int8 value 1)
        got = dequantize(block.numpy(), GGMLQuantizationType[f.ggml_name]).reshape(-1)
        want = felix.dequantize(block, f.name, [f.block_size], backend="reference").numpy()
        np.testing.assert_array_equal(got, want)
        assert np.ptp(got) > 0 or f.packing == "int8", f.name  # the packing matters: not every element is equal


def test_rq4_is_the_fork_type_and_codebook():
    f = get_format("rq4")
    assert (f.ggml_type, f.block_size, f.bytes_per_block) == (42, 32, 18)
    cb = f.codebook_tensor()
    assert cb.dtype == torch.float32 and cb.numel() == 16
    assert torch.all(cb[1:] > cb[:-1]), "codebook must ascend"
    assert torch.equal(cb, -cb.flip(0)), "codebook must be symmetric"
    assert RQ4_CODEBOOK[-1] == 0.12281943 and RQ4_CODEBOOK[8] == 0.00492020


def test_iq4_nl_values_are_ggml_kvalues():
    assert IQ4_NL_VALUES == (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def test_cpp_layouts_match_table():
    ext, why = _ext.load()
    if ext is None:
        pytest.skip(why)
    layouts = ext.layouts()
    assert set(layouts) == set(FORMATS)
    for name, f in FORMATS.items():
        got = layouts[name]
        assert (got["ggml_type"], got["block_size"], got["bytes_per_block"], got["scale_offset"]) == (
            f.ggml_type,
            f.block_size,
            f.bytes_per_block,
            f.scale_offset,
        ), name
        assert got["codebook_size"] == (len(f.codebook) if f.codebook else 0), name


def test_cpp_fp16_conversion_matches_torch():
    """The extension's fp32->fp16 rounding (RNE, subnormals, overflow) equals torch's on every class."""
    ext, why = _ext.load()
    if ext is None:
        pytest.skip(why)
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2**31, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    vals = bits.view(torch.float32)
    vals = torch.cat(
        [
            vals,
            -vals,
            torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 5.96e-8, 2.98e-8, 2.99e-8, 6.1e-5, float("inf")]),
        ]
    )
    vals = vals[~torch.isnan(vals)]
    want = vals.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    got = torch.tensor([ext.fp32_to_fp16(float(v)) for v in vals])
    assert torch.equal(got, want)
    back = torch.tensor([ext.fp16_to_fp32(int(h)) for h in want], dtype=torch.float32)
    assert torch.equal(back, want.to(torch.int16).view(torch.float16).to(torch.float32))


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown quantization format 'q5_k'.*rq4"):
        get_format("q5_k")
    assert felix.get_format("RQ4") is FORMATS["rq4"]


def test_bits_per_weight():
    assert {n: f.bits_per_weight for n, f in FORMATS.items()} == {
        "q8_0": 8.5,
        "q4_0": 4.5,
        "iq4_nl": 4.5,
        "rq4": 4.5,
        "tq2_0": 2.0625,
    }
