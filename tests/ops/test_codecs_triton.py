"""Triton codec kernels under the interpreter (TRITON_INTERPRET=1), against the torch reference.

Each case runs in an isolated, spawned worker (see felix/testing/isolated.py): Triton picks the
interpreter when a kernel is *defined*, and an out-of-bounds access would kill the process. Shapes
are tiny and ragged (block counts that do not fill a tile); bf16 is only tested as an input that the
launcher upcasts, never as kernel math (the interpreter's bf16 is wrong, triton-lang/triton#11584).
"""

import pytest
import torch

from felix.core.formats import FORMATS, get_format


def shapes_for(fmt: str):
    b = get_format(fmt).block_size
    if fmt == "iq4_nl":  # 16 sequential sum passes per program: the slowest kernel to interpret
        return [(1, b), (5, 3 * b)]
    return [(1, b), (3, 2 * b), (5, 3 * b), (2, 1, 7 * b)] if b == 32 else [(1, b), (3, b), (2, 3 * b)]


def awkward(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(*shape[:-1], 1, generator=g))
    flat = x.view(-1, x.shape[-1])
    flat[0, :32] = 0.0  # all-zero block
    if flat.shape[1] >= 64:
        a = flat[0, 32:64].abs().max() * 2
        flat[0, 33], flat[0, 40] = -a, a  # tie for the largest |x|
    if flat.shape[0] > 1:
        flat[1, :32] = torch.randn(32, generator=g) * 1e-39  # float32 subnormals
    return x


def case_quantize(fmt: str, seed: int):
    """Runs in the interpreter worker: kernel bytes vs reference bytes, for float32 and float16 input."""
    from felix.ops.kernels import codecs as kernels
    from felix.ops.reference import codecs as reference

    mismatches = []
    for shape in shapes_for(fmt):
        x = awkward(shape, seed)
        for inp in (x, x.to(torch.float16)):
            got, want = kernels.quantize(inp.contiguous(), fmt), reference.quantize(inp.float(), fmt)
            if got.shape != want.shape or not torch.equal(got, want):
                bad = (got != want).nonzero() if got.shape == want.shape else "shape"
                mismatches.append((shape, str(inp.dtype), str(bad[:3].tolist() if hasattr(bad, "tolist") else bad)))
    return mismatches


def case_dequantize(fmt: str, seed: int):
    from felix.ops.kernels import codecs as kernels
    from felix.ops.reference import codecs as reference

    mismatches = []
    for shape in shapes_for(fmt):
        blocks = reference.quantize(awkward(shape, seed), fmt)
        for dtype in (torch.float32, torch.float16):
            got = kernels.dequantize(blocks, fmt, list(shape), dtype)
            want = reference.dequantize(blocks, fmt, list(shape), dtype)
            if got.dtype != dtype or not torch.equal(got, want):
                mismatches.append((shape, str(dtype)))
    return mismatches


def case_public_api(fmt: str, seed: int):
    """felix.quantize / felix.dequantize with backend='triton' dispatch to the kernels on CPU tensors."""
    import felix

    x = awkward((3, 2 * get_format(fmt).block_size), seed)
    b = felix.quantize(x, fmt, backend="triton")
    ok_bytes = torch.equal(b, felix.quantize(x, fmt, backend="reference"))
    ok_values = torch.equal(
        felix.dequantize(b, fmt, x.shape, backend="triton"), felix.dequantize(b, fmt, x.shape, backend="reference")
    )
    return ok_bytes, ok_values, felix.backends()["triton"].reason


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_triton_quantize_matches_reference(interpret, fmt, seed):
    assert interpret(case_quantize, fmt, seed) == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_triton_dequantize_matches_reference(interpret, fmt, seed):
    assert interpret(case_dequantize, fmt, seed) == []


@pytest.mark.parametrize("fmt", ["rq4", "tq2_0"])
def test_triton_backend_through_public_api(interpret, fmt, seed):
    ok_bytes, ok_values, reason = interpret(case_public_api, fmt, seed)
    assert "interpreter" in reason
    assert ok_bytes and ok_values
