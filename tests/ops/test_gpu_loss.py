"""GPU tier for the fused CE + QUAIL loss: the Triton kernel on real hardware against float64 math at
Felix sizes, with NaN/Inf checks and a peak-memory check that the N x V logits never exist."""

import pytest
import torch

import felix
from felix.ops.reference.loss import clear_margin
from felix.testing.loss_cases import make_case
from felix.ops.reference.tolerances import tolerances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")

BARS = tolerances("linear_ce_quail/gpu")


def float64_chunks(h, w, b, t, wl, margin, lambda_q, z_loss, chunk=1024):
    """loss parts and dL/dh via the spec in float64, one chunk of rows at a time (memory-bounded)."""
    from felix.ops.reference.loss import chunked_loss_and_grads

    parts, dh, dw, db, _ = chunked_loss_and_grads(
        h.double(), w.double(), t, wl, b.double() if b is not None else None, margin, lambda_q, z_loss, -100, chunk
    )
    return parts, dh, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,v", [(1000, 256, 32000), (4096, 1024, 32003)])
def test_triton_loss_on_gpu(seed, dtype, n, d, v):
    h, w, b, t, wl = make_case(seed, n, d, v, "random", dtype=dtype)
    h, w, b, t, wl = (x.cuda() for x in (h, w, b, t, wl))
    margin = clear_margin(h, w, b, t, gap=1e-2)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = felix.linear_ce_quail(
        leaves[0], leaves[1], t, wl, margin=margin, lambda_q=0.3, z_loss=1e-3, bias=leaves[2], backend="triton"
    )
    grads = torch.autograd.grad(out.loss, leaves)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    parts, dh, dw = float64_chunks(h, w, b, t, wl, margin, 0.3, 1e-3)
    assert abs(float(out.loss) - float(parts[0])) <= BARS[dtype] * max(1.0, abs(float(parts[0])))
    for g, want in ((grads[0], dh), (grads[1], dw)):
        assert float((g.double() - want).abs().max() / want.abs().max()) <= BARS[dtype]


def test_peak_memory_stays_below_the_logits():
    n, d, v = 8192, 1024, 32000
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = felix.linear_ce_quail(h, w, t, torch.arange(0, v, 7, device="cuda"), backend="triton", chunk_size=1024)
    out.loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    logits_fp32 = n * v * 4
    assert peak < 0.5 * logits_fp32, f"peak {peak / 2**20:.0f} MiB vs fp32 logits {logits_fp32 / 2**20:.0f} MiB"
