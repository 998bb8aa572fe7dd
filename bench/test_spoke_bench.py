"""Spoke residual benchmarks (GPU only): Felix's fused spoke op (norm in the down-projection's prologue, SiLU
bottleneck and up-projection in registers, gate + residual in the epilogue) against its peers in the same run:
(a) torch eager, the fork's formula as separate ops (rmsnorm, matmul, silu, matmul, sigmoid gate, add), (b) a
Python loop over the spokes' small matmuls (the fork's legacy per-spoke path), (c) torch.compile of (a), at Felix
shapes (d 1024 / 1280, 4 spokes of rank 8 / 64, 2K-16K tokens), forward and forward+backward with the hub frozen
(dh still flows, as when training spokes). Ratios are reported, never asserted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import felix
from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)

DIMS = [1024] if QUICK else [1024, 1280]
TOKENS = [2048] if QUICK else [2048, 8192, 16384]
RANKS = [8] if QUICK else [8, 64]
N_SPOKES = 4
IMPLS = ["felix-fused", "torch-eager", "per-spoke-loop", "torch-compile"]


def eager(h, g, wd, wu, gb, n, eps=1e-5):
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * g).to(h.dtype)
    return h + (torch.sigmoid(gb) * (F.silu(normed @ wd.t()) @ wu.t()).float() / n).to(h.dtype)


def per_spoke(h, g, wd, wu, gb, n, eps=1e-5):
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * g).to(h.dtype)
    r = wd.shape[0] // n
    total = sum(F.silu(normed @ wd[s * r : (s + 1) * r].t()) @ wu[:, s * r : (s + 1) * r].t() for s in range(n))
    return h + (torch.sigmoid(gb) * total.float() / n).to(h.dtype)


_compiled = torch.compile(eager, dynamic=False)


def forward_fn(impl, h, g, wd, wu, gb):
    if impl == "felix-fused":
        return lambda: felix.spoke_residual(h, g, wd, wu, gb, N_SPOKES, 1e-5, backend="triton")
    if impl == "torch-eager":
        return lambda: eager(h, g, wd, wu, gb, N_SPOKES)
    if impl == "per-spoke-loop":
        return lambda: per_spoke(h, g, wd, wu, gb, N_SPOKES)
    if impl == "torch-compile":
        return lambda: _compiled(h, g, wd, wu, gb, N_SPOKES)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("d", DIMS)
def test_spoke_gpu(gpu, measure, impl, mode, rank, tokens, d):
    gen = torch.Generator().manual_seed(0)
    width = N_SPOKES * rank
    h = torch.randn(tokens, d, generator=gen).to(gpu, torch.bfloat16).requires_grad_(mode != "fwd")
    g = (1 + 0.1 * torch.randn(d, generator=gen)).to(gpu).requires_grad_(mode != "fwd")
    wd = (torch.randn(width, d, generator=gen) / d**0.5).to(gpu, torch.bfloat16).requires_grad_(mode != "fwd")
    wu = (torch.randn(d, width, generator=gen) * 0.02).to(gpu, torch.bfloat16).requires_grad_(mode != "fwd")
    gb = torch.zeros(1, device=gpu).requires_grad_(mode != "fwd")
    fwd = forward_fn(impl, h, g, wd, wu, gb)
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                fwd()
    else:
        dy = torch.randn(tokens, d, device=gpu, dtype=torch.bfloat16)
        fn = lambda: fwd().backward(dy)  # noqa: E731
    fn()
    flops = 4.0 * tokens * d * width * (1 if mode == "fwd" else 3)
    measure(
        gpu,
        f"spoke {mode} h[{tokens},{d}] {N_SPOKES}x{rank} bf16",
        impl,
        fn,
        flops=flops,
        bytes_moved=2.0 * tokens * d * 2 * (1 if mode == "fwd" else 3),
        candidate=impl == "felix-fused",
    )
