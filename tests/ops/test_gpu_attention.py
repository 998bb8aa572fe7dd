"""GPU tier for the Triton attention (skipped without a CUDA/ROCm device).

Bar, per output and per gradient: the kernel's max error against a float32 reference is at most twice
PyTorch SDPA's max error in the same dtype, on the same inputs; nothing is NaN or Inf.
Shapes sweep head_dim 32/64/128, ragged lengths, GQA, causal and not, up to T = 8192.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import felix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")

# (B, H, H_kv, T, D, causal)
SHAPES = [
    (2, 8, 2, 128, 64, True),
    (2, 4, 2, 333, 32, True),
    (1, 4, 4, 1000, 128, True),
    (1, 8, 2, 2049, 64, False),
    (1, 4, 1, 4096, 128, True),
    (1, 4, 2, 8192, 64, True),
    (1, 2, 2, 8192, 128, True),
]


def run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def sdpa(causal):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}T{}D{}{}".format(*s[:5], "c" if s[5] else ""))
def test_triton_attention_error_at_most_twice_sdpa(shape, dtype, gen):
    B, H, H_kv, T, D, causal = shape
    dev = torch.device("cuda")
    q = torch.randn(B, H, T, D, generator=gen).to(dev)
    k = torch.randn(B, H_kv, T, D, generator=gen).to(dev)
    v = torch.randn(B, H_kv, T, D, generator=gen).to(dev)
    dout = torch.randn(B, H, T, D, generator=gen).to(dev)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = run(lambda *a: felix.attention(*a, causal=causal, backend="reference"), q, k, v, dout)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    lo = [t.to(dtype) for t in (q, k, v, dout)]
    got = run(lambda *a: felix.attention(*a, causal=causal, backend="triton"), *lo)
    peer = run(sdpa(causal), *lo)
    for name, g, p, w in zip(["out", "dq", "dk", "dv"], got, peer, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert torch.isfinite(g).all(), f"{name}: NaN/Inf from the kernel"
        err = float((g.float() - w).abs().max())
        err_sdpa = float((p.float() - w).abs().max())
        assert err <= 2 * err_sdpa + 1e-6, f"{name}: kernel max error {err:.3g} > 2 x SDPA's {err_sdpa:.3g}"


def test_automatic_dispatch_picks_triton_and_scale_defaults(gen):
    from felix.ops.dispatch import resolve_backend

    assert resolve_backend("attention_fwd", None, torch.device("cuda")) == "triton"
    q, k, v = (torch.randn(1, 2, 64, 64, generator=gen).cuda().half() for _ in range(3))
    out = felix.attention(q, k, v, causal=False)
    ref = felix.attention(q, k, v, causal=False, scale=1 / math.sqrt(64), backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)


def test_large_logits_stay_finite(gen):
    """Scores around +-1e4 (max-subtraction must hold) give finite outputs and gradients."""
    q = (torch.randn(1, 2, 300, 64, generator=gen) * 30).cuda().bfloat16()
    k = (torch.randn(1, 2, 300, 64, generator=gen) * 30).cuda().bfloat16()
    v = torch.randn(1, 2, 300, 64, generator=gen).cuda().bfloat16()
    got = run(lambda *a: felix.attention(*a, backend="triton"), q, k, v, torch.ones_like(q))
    assert all(torch.isfinite(t).all() for t in got)
