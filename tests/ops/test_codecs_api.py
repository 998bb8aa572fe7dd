"""The public codec API: bad input gets a clear ValueError, dispatch picks the right backend, and the
custom ops are well-formed torch.library ops that torch.compile can trace."""

import pytest
import torch

import felix
from felix.ops import codecs as codec_ops
from felix.ops.dispatch import resolve_backend


@pytest.fixture
def x(gen):
    return torch.randn(4, 64, generator=gen)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "bad,match",
    [
        (float("nan"), r"non-finite value\(s\) \(NaN\), first at index \(1, 3\)"),
        (float("inf"), r"non-finite value\(s\) \(Inf\), first at index \(1, 3\)"),
        (1e9, r"beyond .* block scale overflows fp16"),
    ],
)
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


def test_quantize_refuses_scalars():
    with pytest.raises(ValueError, match="got a scalar"):
        felix.quantize(torch.tensor(1.0), "q8_0")


def _cpu_backends():
    return ["reference"] + (["cpu"] if felix.backends()["cpu"].available else [])


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("fmt", list(felix.FORMATS))
def test_empty_inputs_give_empty_outputs_of_the_right_shape(fmt, backend):
    """Like torch's own ops: an empty tensor in (no rows, rows of length 0, a zero-sized batch), the empty
    result of the shape quantize/dequantize would give out."""
    f = felix.get_format(fmt)
    for shape in [(0, f.block_size), (3, 0), (2, 0, 2 * f.block_size), (0,)]:
        x = torch.zeros(shape)
        b = felix.quantize(x, fmt, backend=backend)
        want = (*shape[:-1], shape[-1] // f.block_size * f.bytes_per_block)
        assert b.dtype == torch.uint8 and tuple(b.shape) == want, (shape, tuple(b.shape))
        for dtype in (torch.float32, torch.float16):
            y = felix.dequantize(b, fmt, shape, dtype=dtype, backend=backend)
            assert y.dtype == dtype and tuple(y.shape) == shape


def test_blocks_in_another_byte_order_are_refused(gen):
    """A transposed view has the right byte count but not ggml's byte order: it used to decode to garbage."""
    w = torch.randn(68, 64, generator=gen)  # q8_0 rows of 64 -> 68 bytes: the blocks tensor is square
    b = felix.quantize(w, "q8_0")
    assert b.shape == (68, 68)
    with pytest.raises(ValueError, match="not contiguous"):
        felix.dequantize(b.t(), "q8_0", w.shape)
    with pytest.raises(ValueError, match=r"has shape \(272, 17\), whose rows are not whole 34-byte blocks"):
        felix.dequantize(b.reshape(272, 17), "q8_0", w.shape)
    # the blocks as quantize returns them, and the same bytes as one flat buffer, decode alike
    assert torch.equal(felix.dequantize(b.reshape(-1), "q8_0", w.shape), felix.dequantize(b, "q8_0", w.shape))


def test_meta_tensors_propagate_shapes():
    """The custom ops' fake implementations serve the meta device: shapes and dtypes come out, no values (and
    no value checks, which need values)."""
    x = torch.empty(4, 64, device="meta")
    b = felix.quantize(x, "rq4")
    assert b.device.type == "meta" and b.shape == (4, 36) and b.dtype == torch.uint8
    y = felix.dequantize(b, "rq4", (4, 64), dtype=torch.float16)
    assert y.device.type == "meta" and y.shape == (4, 64) and y.dtype == torch.float16


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


# ------------------------------------------------------------------------- quant_matmul's edge shapes
@pytest.mark.parametrize("fmt", ["q4_0", "iq4_nl", "rq4"])
def test_quant_matmul_with_nothing_to_sum_or_no_outputs(gen, fmt):
    """K = 0 sums nothing: zeros [M, N] (as torch.matmul gives), with x's gradient (empty) flowing; N = 0 or
    M = 0: the empty result. These raised RuntimeError in the reference's reshape."""
    f = felix.get_format(fmt)
    x = torch.randn(3, 0, generator=gen, requires_grad=True)
    y = felix.quant_matmul(x, torch.zeros(5, 0, dtype=torch.uint8), fmt, 5)
    assert y.shape == (3, 5) and torch.equal(y, torch.matmul(x.detach(), torch.zeros(0, 5)))
    y.sum().backward()
    assert x.grad.shape == (3, 0)
    assert felix.quant_matmul(
        torch.randn(2, 4, 64, generator=gen), torch.zeros(0, 2 * f.bytes_per_block, dtype=torch.uint8), fmt, 0
    ).shape == (2, 4, 0)
    w = torch.randn(6, 64, generator=gen) * 0.05
    assert felix.quant_matmul(torch.zeros(0, 64), felix.quantize(w, fmt), fmt, 6).shape == (0, 6)


def test_quant_matmul_refuses_blocks_in_another_byte_order(gen):
    w = torch.randn(36, 64, generator=gen) * 0.05  # rq4: 2 blocks of 18 bytes per row -> blocks [36, 36]
    b = felix.quantize(w, "rq4")
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(ValueError, match="not contiguous"):
        felix.quant_matmul(x, b.t(), "rq4", 36)
    assert torch.equal(felix.quant_matmul(x, b.reshape(-1), "rq4", 36), felix.quant_matmul(x, b, "rq4", 36))


def test_quant_matmul_on_meta_tensors_propagates_shapes():
    y = felix.quant_matmul(
        torch.empty(2, 3, 64, device="meta"), torch.empty(5, 36, dtype=torch.uint8, device="meta"), "rq4", 5
    )
    assert y.device.type == "meta" and y.shape == (2, 3, 5)
