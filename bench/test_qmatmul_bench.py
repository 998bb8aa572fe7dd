"""W4A16 quantized matmul benchmarks (GPU only) at felix-300m shapes (d 1024, ffn 2816, vocab 32K):
decode (M = 1, 4, 8: the GEMV path, bandwidth-bound) and prefill (M = 2048: the GEMM path).

Peers in the same run: dequantize-then-torch.matmul (what running a quantized model costs without a
fused kernel) and a plain bf16 torch.matmul on a bf16 copy of the weight (the unquantized model).
bytes_moved counts the weight as stored by each implementation (4.5 bits/weight for the quantized ones,
16 bits for bf16) plus activations in and out, so "% copy BW" of a decode case is the share of the
device's copy bandwidth the kernel reaches on its own bytes. Goals (reported, not asserted): decode
>= 70% of copy bandwidth, >= 2.5x faster than the bf16 GEMV.
"""

from __future__ import annotations

import pytest
import torch

import felix

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)

D, FFN, VOCAB = 1024, 2816, 32768
# (name, N = out_features, K = in_features)
LAYERS = [("ffn_up", FFN, D), ("ffn_down", D, FFN), ("lm_head", VOCAB, D)]
if QUICK:
    LAYERS = [("ffn_up", 256, 128)]
TOKENS = [1, 4, 8] + ([64] if QUICK else [2048])
FMT = "rq4"
IMPLS = ["felix-triton", "felix-hip", "dequantize+torch.matmul", "torch-bf16-matmul"]


def case_bytes(m: int, n: int, k: int, weight_bits: float, act_bytes: int = 2) -> float:
    return n * k * weight_bits / 8 + m * k * act_bytes + m * n * act_bytes


@pytest.mark.parametrize("m", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
@pytest.mark.parametrize("impl", IMPLS)
def test_quant_matmul_gpu(measure, gpu, impl, layer, m):
    name, n, k = layer
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(gpu)
    x = torch.randn(m, k, generator=g).to(gpu, torch.bfloat16)
    blocks = felix.quantize(w, FMT)
    bits = felix.get_format(FMT).bits_per_weight
    if impl in ("felix-triton", "felix-hip"):
        backend = impl.split("-")[1]
        if not felix.backends()[backend].available:
            pytest.skip(felix.backends()[backend].reason)
        fn = lambda: felix.quant_matmul(x, blocks, FMT, n, backend=backend)  # noqa: E731
        nbytes = case_bytes(m, n, k, bits)
    elif impl == "dequantize+torch.matmul":
        fn = lambda: x @ felix.dequantize(blocks, FMT, (n, k), torch.bfloat16).t()  # noqa: E731
        nbytes = case_bytes(m, n, k, bits)
    else:
        wb = w.to(torch.bfloat16)
        fn = lambda: x @ wb.t()  # noqa: E731
        nbytes = case_bytes(m, n, k, 16)
    phase = "decode" if m <= 8 else "prefill"
    measure(
        gpu,
        f"qmm {phase} {name} {n}x{k} M={m} {FMT} bf16",
        impl,
        fn,
        bytes_moved=nbytes,
        flops=2.0 * m * n * k,
        candidate=impl.startswith("felix"),
    )
