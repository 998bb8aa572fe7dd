"""SpliceCore low-rank benchmarks (GPU only): Felix's fused GEMM (low-rank term in the epilogue) against
(a) the bare GEMM x Wᵀ, (b) the two-GEMM baseline `y = x@W.T; y.addmm_(x@A.T, B.T, alpha=g)` that unsloth
uses, (c) three separate matmuls, at Felix shapes (d 1024, ffn 2816, r 8 and 64, 2K-16K tokens), forward
and forward+backward (W frozen, as when training splices on a fixed base, and trainable). Goals
(reported, not asserted): <= 1.05x the bare GEMM's time and >= 1.3x faster than (b).
"""

from __future__ import annotations

import pytest
import torch

import felix
from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)

SHAPES = [(1024, 2816)] if QUICK else [(1024, 2816), (2816, 1024)]
TOKENS = [2048] if QUICK else [2048, 8192, 16384]
RANKS = [8] if QUICK else [8, 64]
IMPLS = ["felix-fused", "bare-gemm", "two-gemm-addmm", "three-matmuls"]


def make(tokens, in_f, out_f, r, device, train_w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(device, torch.bfloat16).requires_grad_(train_w)
    a = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(device, torch.bfloat16).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) / r**0.5).to(device, torch.bfloat16).requires_grad_()
    return x, w, a, b, 0.5


def forward_fn(impl, x, w, a, b, g):
    if impl == "felix-fused":
        return lambda: felix.lowrank_linear(x, w, a, b, g, backend="triton")
    if impl == "bare-gemm":
        return lambda: x @ w.t()
    if impl == "two-gemm-addmm":
        return lambda: (x @ w.t()).addmm_(x @ a.t(), b.t(), alpha=g)
    if impl == "three-matmuls":
        return lambda: x @ w.t() + g * ((x @ a.t()) @ b.t())
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd frozen W", "fwd+bwd trainable W"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("in_f,out_f", SHAPES, ids=lambda s: str(s))
def test_lowrank_gpu(gpu, measure, impl, mode, r, tokens, in_f, out_f):
    x, w, a, b, g = make(tokens, in_f, out_f, r, gpu, train_w=mode.endswith("trainable W"))
    fwd = forward_fn(impl, x, w, a, b, g)
    if mode == "fwd":
        fn = lambda: fwd()  # noqa: E731
        with torch.no_grad():
            fwd()
        fl = 2.0 * tokens * in_f * out_f
    else:
        dy = torch.randn(tokens, out_f, device=gpu, dtype=torch.bfloat16)
        fn = lambda: fwd().backward(dy)  # noqa: E731
        fl = 2.0 * tokens * in_f * out_f * (3 if w.requires_grad else 2)
    fn()
    measure(
        gpu,
        f"lowrank {mode} x[{tokens},{in_f}] W[{out_f},{in_f}] r={r} bf16",
        impl,
        fn,
        flops=fl,
        candidate=impl == "felix-fused",
    )
