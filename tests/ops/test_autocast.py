"""Every op under CPU autocast (torch.autocast("cpu", dtype=torch.bfloat16)): correct and faithful to its spec.

The rule (felix/ops/dispatch.py): a matmul-like op takes its floating operands in the autocast dtype, as F.linear /
SDPA do, and then computes exactly its spec on them with autocast off inside (fp32 accumulation; fp32 logits
for the loss). Codecs are not matmuls and do not change. The loss test is in the style of Liger-Kernel's
test_amp (fp32 leaves, the op called under autocast, compared with torch's own autocast path), plus an exact
float64 truth on the bf16-rounded operands with bounds derived below.
"""

import pytest
import torch
import torch.nn.functional as F

import felix
from felix.ops.reference.loss import textbook_loss
from felix.testing.loss_cases import make_case

BF16 = torch.bfloat16
U_BF16 = 2.0**-8  # bf16 unit roundoff: 8 significant bits


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def _truth_with_dz(hb, wb, bb, t, wl, margin, lambda_q, z_loss):
    """float64 truth on the (already bf16-rounded) operands, and dL/dz for the rounding bounds."""
    z = (hb.double() @ wb.double().t() + (bb.double() if bb is not None else 0)).requires_grad_()
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    parts = textbook_loss(z, eye, t, wl, margin, lambda_q, z_loss)  # z @ I = z: the truth as a function of logits
    (dz,) = torch.autograd.grad(parts[0], z)
    return parts, dz


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_loss_amp_reference_matches_spec_on_autocast_operands(seed, bias, chunk):
    """The issue's repro: fp32 leaves, the reference backend under CPU bf16 autocast (raised a scatter dtype
    error before). Parts must equal the float64 spec on the bf16-rounded h, W, b with fp32 logits; grads are
    fp32 (the leaves' dtype) and within the bounds of the bf16 GEMMs that make them."""
    h, w, b, t, wl = make_case(seed, 41, 16, 97, "random", bias=bias)
    hp = dict(margin=2.0, lambda_q=0.3, z_loss=1e-3)
    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    with autocast():
        out = felix.linear_ce_quail(
            leaves[0], leaves[1], t, wl, bias=leaves[2] if bias else None, chunk_size=chunk, backend="reference", **hp
        )
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    hb, wb = h.to(BF16), w.to(BF16)
    bb = b.to(BF16) if bias else None
    truth, dz = _truth_with_dz(hb, wb, bb, t, wl, **hp)
    # fp32 logits of bf16 operands: each product is exact in fp32, the d-term sum and the row reductions
    # round at 2^-24 per step: ~1e-6 relative on O(1..10) values; 2e-5 leaves room and is 20x below the
    # bf16-logits error the issue measured (7.5042 vs 7.5011: 4e-4).
    for name, got, want in zip(("loss", "ce", "hinge", "z_loss"), [x.detach() for x in out[:4]], truth[:4]):
        assert abs(float(got) - float(want)) <= 2e-5 * max(1.0, abs(float(want))), (name, float(got), float(want))
    assert int(out.active_hinge_count) == truth[4]
    # dh = bf16(dz) @ W_bf16, output rounded to bf16: |err| <= u |dz||W| (input) + u |dh| (output) <= 2u |dz||W|
    # dW = sum over chunks of bf16(dz_c)^T h_c rounded to bf16, summed in fp32, then rounded to W's bf16:
    # <= 2u |dz|^T|h| + u |dW| <= 3u |dz|^T|h|; db: the fp32 row sum rounded to bf16 once: u |db|.
    # (the fp32 part of dz is ~1e-6 relative: the 1.01 factor and the absolute 1e-9 cover it)
    bounds = [2 * U_BF16 * (dz.abs() @ wb.double().abs()), 3 * U_BF16 * (dz.abs().t() @ hb.double().abs())]
    truths = [dz @ wb.double(), dz.t() @ hb.double()]
    if bias:
        truths.append(dz.sum(0))
        bounds.append(U_BF16 * dz.sum(0).abs() + 1e-6 * dz.abs().sum(0))
    for name, leaf, want, bound in zip(("dh", "dW", "db"), leaves, truths, bounds):
        assert leaf.grad.dtype == torch.float32, name
        err = (leaf.grad.double() - want).abs()
        assert bool((err <= 1.01 * bound + 1e-9).all()), (
            f"{name}: worst err/bound {float((err / (bound + 1e-30)).max()):.3g}"
        )


def test_loss_amp_like_liger(seed):
    """Liger's test_amp: fp32 inputs, torch's linear + cross_entropy under autocast as the peer (its logits are
    bf16-rounded, Felix's are not), Liger's tolerances (5e-2); lambda_q = 0 is plain CE."""
    h, w, _, t, _ = make_case(seed, 64, 32, 257, "none", bias=False)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with autocast():
        want = F.cross_entropy(F.linear(h1, w1), t)
        got = felix.linear_ce_quail(h2, w2, t, None, lambda_q=0.0, backend="reference").loss
    assert torch.allclose(got, want.float(), atol=5e-2, rtol=5e-2)
    want.backward()
    got.backward()
    for a, b_ in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert a.dtype == b_.dtype == torch.float32
        assert torch.allclose(b_, a, atol=5e-2, rtol=5e-2)


def test_loss_op_ignores_autocast_inside():
    """Called on fp32 tensors directly (the custom op, no API cast), autocast must not leak into the backend:
    the result is bit-identical to the same call outside autocast (it used to compute bf16 logits)."""
    h, w, b, t, wl = make_case(3, 33, 16, 70, "random")
    args = (h, w, t, wl, b, 2.0, 0.1, 0.0, -100, 8, torch.float32, True, "reference")
    plain = torch.ops.felix.linear_ce_quail(*args)
    with autocast():
        inside = torch.ops.felix.linear_ce_quail(*args)
    for p, q in zip(plain, inside):
        assert p.dtype == q.dtype and torch.equal(p, q)


@pytest.mark.parametrize("n_spokes", [0, 2])
def test_felixlm_loss_under_autocast_trains(n_spokes):
    """FelixLM.loss under CPU bf16 autocast (raised before): runs forward and backward, fp32 grads on every
    parameter, finite, and the loss within bf16's reach of the fp32 loss. With spokes (felix.model.spokes) too."""
    from felix.model.felix_lm import FelixLM, preset

    torch.manual_seed(0)
    model = FelixLM(preset("tiny", vocab_size=300, n_spokes=n_spokes))
    if n_spokes:  # trained-like spokes (a fresh W_up = 0 would make the spoke an exact no-op)
        with torch.no_grad():
            for blk in model.blk:
                blk.spoke.w_up_fused.weight.normal_(0.0, 0.1)
    x = torch.randint(0, 300, (2, 24))
    y = torch.roll(x, -1, 1)
    wl = torch.tensor([1, 2, 3, 5, 8])
    fp32 = model.loss(x, y, wl, 2.0, 0.1)
    with autocast():
        amp = model.loss(x, y, wl, 2.0, 0.1)
    amp.loss.backward()
    assert amp.loss.dtype == torch.float32
    assert abs(float(amp.loss) - float(fp32.loss)) <= 5e-2 * float(fp32.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), name


def _same_under_autocast(fn, *inputs):
    """fn(*inputs) under autocast == fn(bf16 inputs) outside it, bit for bit; returns the autocast output."""
    with autocast():
        got = fn(*inputs)
    want = fn(*[x.to(BF16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs])
    assert got.dtype == want.dtype == BF16
    assert torch.equal(got, want)
    return got


def test_attention_lowrank_qmatmul_take_the_autocast_dtype(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(1, 4, 9, 32, generator=g),
        torch.randn(1, 2, 9, 32, generator=g),
        torch.randn(1, 2, 9, 32, generator=g),
    )
    out = _same_under_autocast(lambda a, b_, c: felix.attention(a, b_, c, backend="reference"), q, k, v)
    ref = felix.attention(q.to(BF16).double(), k.to(BF16).double(), v.to(BF16).double(), backend="reference")
    # fp32 accumulation inside, output rounded to bf16 once: u relative (plus fp32's ~1e-6)
    assert float((out.double() - ref).abs().max()) <= U_BF16 * float(ref.abs().max()) + 1e-5

    x, wt = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g) / 8
    a, b_ = torch.randn(4, 64, generator=g) / 8, torch.randn(48, 4, generator=g) / 2
    _same_under_autocast(lambda *t: felix.lowrank_linear(*t, backend="reference"), x, wt, a, b_, 0.5)
    blocks = felix.quantize(wt, "rq4")
    _same_under_autocast(lambda t: felix.quant_matmul(t, blocks, "rq4", 48, backend="reference"), x)
    # gradients reach fp32 leaves in fp32
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with autocast():
        felix.attention(*leaves, backend="reference").float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and bool(torch.isfinite(t.grad).all()) for t in leaves)
    xl = x.clone().requires_grad_()
    with autocast():
        felix.lowrank_linear(xl, wt, a, b_, 0.5, backend="reference").float().sum().backward()
    assert xl.grad.dtype == torch.float32


def test_spoke_residual_ignores_autocast(seed):
    """The spoke residual carries the residual stream (h's dtype is its compute dtype, as RMSNorm under autocast):
    on fp32 tensors its result and gradients are bit-identical inside and outside autocast (before the backends
    ran with autocast off, CPU autocast turned the reference's matmuls into bf16 ones)."""
    g = torch.Generator().manual_seed(seed)
    h, nw = torch.randn(2, 5, 64, generator=g), 1 + torch.randn(64, generator=g) / 4
    wd, wu, gb = torch.randn(16, 64, generator=g) / 8, torch.randn(64, 16, generator=g) / 4, torch.tensor([0.3])

    def run(ctx):
        leaves = [t.clone().requires_grad_() for t in (h, nw, wd, wu, gb)]
        with ctx:
            y = felix.spoke_residual(*leaves, 4, backend="reference")
            y.square().sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    import contextlib

    for plain, inside in zip(run(contextlib.nullcontext()), run(autocast())):
        assert plain.dtype == inside.dtype == torch.float32 and torch.equal(plain, inside)


@pytest.mark.parametrize("fmt", ["rq4", "q4_0", "iq4_nl"])
def test_codecs_unchanged_by_autocast(seed, fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
    for backend in ("reference", "cpu"):
        plain = felix.quantize(w, fmt, backend=backend)
        with autocast():
            inside = felix.quantize(w, fmt, backend=backend)
            back = felix.dequantize(inside, fmt, w.shape, backend=backend)
        assert torch.equal(plain, inside)
        assert back.dtype == torch.float32 and torch.equal(back, felix.dequantize(plain, fmt, w.shape, backend=backend))
