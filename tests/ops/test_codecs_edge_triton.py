"""The codec API's edge inputs (empty tensors, K = 0, transposed blocks) with the Triton backend, under the
interpreter in an isolated worker (tests/conftest.py's `interpret`): the Triton backend goes through the same
public-API validation as the reference and C++ backends (tests/ops/test_codecs_api.py)."""

import torch


def case_triton_edge_inputs():
    """Runs in the interpreter worker: the Triton backend goes through the same public-API validation."""
    import felix

    empty = felix.quantize(torch.zeros(0, 32), "q4_0", backend="triton")
    back = felix.dequantize(torch.zeros(3, 0, dtype=torch.uint8), "rq4", (3, 0), backend="triton")
    zeros = felix.quant_matmul(torch.ones(2, 0), torch.zeros(4, 0, dtype=torch.uint8), "rq4", 4, backend="triton")
    b = felix.quantize(torch.randn(36, 64, generator=torch.Generator().manual_seed(0)), "rq4", backend="triton")
    try:
        felix.dequantize(b.t(), "rq4", (36, 64), backend="triton")
        refused = ""
    except ValueError as e:
        refused = str(e)
    return tuple(empty.shape), tuple(back.shape), zeros.tolist(), refused


def test_triton_backend_edge_inputs_under_the_interpreter(interpret):
    empty, back, zeros, refused = interpret(case_triton_edge_inputs)
    assert empty == (0, 18) and back == (3, 0) and zeros == [[0.0] * 4] * 2
    assert "not contiguous" in refused
