"""The public codec API: bad input gets a clear ValueError, dispatch picks the right backend, and the
custom ops are well-formed torch.library ops that torch.compile can trace."""
import pytest
import torch

import felix
from felix.ops import codecs as codec_ops
from felix.oplib import resolve_backend


@pytest.fixture
def x(gen):
    return torch.randn(4, 64, generator=gen)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad,match", [
    (float("nan"), r"non-finite value\(s\) \(NaN\), first at index \(1, 3\)"),
    (float("inf"), r"non-finite value\(s\) \(Inf\), first at index \(1, 3\)"),
    (1e9, r"beyond .* block scale overflows fp16"),
])
def test_quantize_refuses_non_finite_and_out_of_range(x, bad, match):
    x[1, 3] = bad
    with pytest.raises(ValueError, match=match):
        felix.quantize(x, "q8_0")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_quantize_refuses_non_float_dtypes(dtype):
    with pytest.raises(ValueError, match=f"floating-point tensor.*{dtype}"):
        felix.quantize(torch.zeros(2, 32, dtype=dtype), "q4_0")


@pytest.mark.parametrize("fmt,cols", [("q8_0", 48), ("rq4", 33), ("tq2_0", 128)])
def test_quantize_refuses_unaligned_rows(fmt, cols):
    with pytest.raises(ValueError, match=rf"last dimension \({cols}\) must be a multiple of the block size"):
        felix.quantize(torch.randn(2, cols), fmt)


def test_quantize_refuses_scalars_and_empty_rows():
    with pytest.raises(ValueError, match="non-empty dimension"):
        felix.quantize(torch.tensor(1.0), "q8_0")
    with pytest.raises(ValueError, match="non-empty dimension"):
        felix.quantize(torch.zeros(3, 0), "q8_0")


def test_unknown_format_and_backend(x):
    with pytest.raises(ValueError, match="unknown quantization format 'q3_k'"):
        felix.quantize(x, "q3_k")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        felix.quantize(x, "q8_0", backend="cuda")


def test_dequantize_refuses_wrong_length_and_dtype(x):
    b = felix.quantize(x, "rq4")
    with pytest.raises(ValueError, match=r"shape \(4, 96\) needs 216 bytes .* has 144"):
        felix.dequantize(b, "rq4", (4, 96))
    with pytest.raises(ValueError, match="uint8 tensor of ggml blocks"):
        felix.dequantize(b.to(torch.int8), "rq4", x.shape)
    with pytest.raises(ValueError, match="multiple of the block size"):
        felix.dequantize(b, "rq4", (4, 36))
    with pytest.raises(ValueError, match="can produce"):
        felix.dequantize(b, "rq4", x.shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"shape \(2, 64\) needs 72 bytes .* has 71"):
        felix.dequantize(b.view(-1)[:71], "rq4", (2, 64))


def test_forced_backends_that_cannot_run_say_why(x):
    if not felix.backends()["triton"].available:
        with pytest.raises(ValueError, match="backend 'triton' is not available: .*"):
            felix.quantize(x, "q8_0", backend="triton")
    if felix.backends()["cpu"].available:
        with pytest.raises(ValueError, match="needs CPU tensors"):
            resolve_backend("quantize", "cpu", torch.device("cuda"))


# ------------------------------------------------------------------------------- behaviour
def test_shapes_and_input_dtypes(gen):
    x = torch.randn(2, 3, 256, generator=gen)
    for fmt, f in felix.FORMATS.items():
        b = felix.quantize(x, fmt)
        assert b.dtype == torch.uint8 and b.shape == (2, 3, 256 // f.block_size * f.bytes_per_block)
        # float16 / bfloat16 / float64 inputs quantize their float32 value
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            xd = x.to(dtype)
            assert torch.equal(felix.quantize(xd, fmt), felix.quantize(xd.to(torch.float32), fmt))
        # non-contiguous input is accepted
        assert torch.equal(felix.quantize(x.transpose(0, 1), fmt).transpose(0, 1), b)


def test_automatic_dispatch():
    cpu = felix.backends()["cpu"].available
    assert resolve_backend("quantize", None, torch.device("cpu")) == ("cpu" if cpu else "reference")
    assert resolve_backend("quantize", "reference", torch.device("cpu")) == "reference"


def test_backends_report_every_backend_with_a_reason():
    report = felix.backends()
    assert set(report) == {"reference", "triton", "cpu", "hip"}
    assert report["reference"].available
    assert all(isinstance(s.reason, str) and s.reason for s in report.values())


# ------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("fmt", ["q8_0", "rq4"])
def test_custom_ops_pass_opcheck(x, fmt):
    torch.library.opcheck(codec_ops._quantize_op, (x, fmt, "reference"))
    b = felix.quantize(x, fmt)
    torch.library.opcheck(codec_ops._dequantize_op, (b, fmt, list(x.shape), torch.float32, "reference"))


def test_torch_compile_traces_callers_without_graph_breaks(x):
    def roundtrip(t):
        return felix.dequantize(felix.quantize(t * 2, "q4_0"), "q4_0", t.shape) + 1

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))
