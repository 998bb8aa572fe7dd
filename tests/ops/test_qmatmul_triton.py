"""Triton W4A16 matmul under the interpreter vs a float64 reference on the dequantized weights: all three
4-bit formats, GEMV (with and without split-K) and GEMM paths, ragged M and N, fp32 and fp16 activations
(bf16 math is wrong in the interpreter, triton-lang/triton#11584: bf16 runs in the GPU tier only).

Bounds: fp32 activations -> the kernel's fp32 sums differ from float64 by a few ulps of sum |x||w|;
fp16 activations add the fp16 rounding of the output (2^-11 relative) and, on the GEMM path, of the
decoded weights fed to tl.dot (2^-11 relative per weight).
"""

import pytest
import torch

from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS

# (M, N, K, path, split_k): ragged M and N against the interpreter tiles (gemv BN=8, gemm 16x16).
CASES = [
    (1, 13, 64, "gemv", None),
    (3, 9, 96, "gemv", 2),  # split-K with a ragged last split (3 blocks in steps of 2)
    (8, 17, 64, "gemv", None),
    (19, 21, 96, "gemm", None),
]


def error_vs_float64(fmt: str, dtype_name: str, seed: int):
    """Runs in the interpreter worker: max |y - ref| / bound for every case (must be <= 1)."""
    import felix
    from felix.ops.kernels import qmatmul as kernels

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    results = []
    for m, n, k, path, split in CASES:
        w = torch.randn(n, k, generator=g) * 0.05 * torch.exp(torch.randn(n, 1, generator=g))
        blocks = felix.quantize(w, fmt)
        wd = felix.dequantize(blocks, fmt, (n, k)).double()
        x = torch.randn(m, k, generator=g).to(dtype)
        y = kernels.quant_matmul(x, blocks, fmt, n, path=path, split_k=split)
        ref = x.double() @ wd.t()
        scale = x.double().abs() @ wd.abs().t()
        if dtype == torch.float32:
            bound = 1e-6 * scale + 1e-30
        else:
            bound = 2.0**-11 * ref.abs() + (2.0**-10 if path == "gemm" else 1e-6) * scale + 1e-30
        ratio = float(((y.double() - ref).abs() / bound).max())
        results.append(
            (
                (m, n, k, path, split),
                y.dtype == dtype and tuple(y.shape) == (m, n),
                bool(torch.isfinite(y).all()),
                ratio,
                float((y.double() - ref).abs().max()),
            )
        )
    return results


def public_api_under_interpreter(seed: int):
    import felix

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 64, generator=g) * 0.1
    x = torch.randn(2, 3, 64, generator=g)
    b = felix.quantize(w, "rq4")
    got = felix.quant_matmul(x, b, "rq4", 40, backend="triton")
    want = felix.quant_matmul(x, b, "rq4", 40, backend="reference")
    return tuple(got.shape), float((got - want).abs().max())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt", QUANT_MATMUL_FORMATS)
def test_triton_quant_matmul_matches_float64(interpret, fmt, dtype, seed):
    for case, shape_ok, finite, ratio, abs_err in interpret(error_vs_float64, fmt, dtype, seed):
        assert shape_ok and finite, case
        assert ratio <= 1.0, f"{fmt} {dtype} {case}: error {abs_err:.3g} is {ratio:.2f}x the bound"


def test_triton_backend_through_public_api(interpret, seed):
    shape, err = interpret(public_api_under_interpreter, seed)
    assert shape == (2, 3, 40)
    assert err < 1e-5


def tiny_model_logits_gap(seed: int):
    """A quantized TinyLM (QuantLinear on the Triton kernels) vs its twin holding the dequantized weights
    in nn.Linear: max |logit difference| / max |logit|, for decode-sized (5 tokens) and prefill-sized (22) inputs."""
    import felix
    from test_qmatmul_api import TinyLM

    torch.manual_seed(seed)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    felix.quantize_model_linears(model, "rq4", backend="triton")
    for i, blk in enumerate(model.layers):
        for name in ("gate", "up", "down"):
            getattr(twin.layers[i], name).weight.data.copy_(getattr(blk, name).dequantized_weight())
    g = torch.Generator().manual_seed(seed)
    gaps = []
    for shape in [(1, 5), (2, 11)]:
        ids = torch.randint(0, 96, shape, generator=g)
        with torch.no_grad():
            got, want = model(ids), twin(ids)
        gaps.append(float((got - want).abs().max() / want.abs().max()))
    return gaps


def test_quantized_tiny_model_logits_match_the_dequantized_model(interpret, seed):
    gaps = interpret(tiny_model_logits_gap, seed)
    assert all(gap <= 1e-5 for gap in gaps), gaps
