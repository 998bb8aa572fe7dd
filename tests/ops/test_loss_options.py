"""The loss options peers offer (Liger-Kernel's fused linear cross-entropy): reduction mean / sum / none,
label smoothing, logit softcap -- the spec (felix.ops.reference.loss.full_logits_loss) and the chunked reference
backend against textbook float64 math (felix.ops.reference.loss.textbook_loss: F.cross_entropy's own label smoothing, tanh
softcap, the hinge one row at a time). The Triton backend's cases are in tests/ops/test_loss_triton.py."""

import pytest
import torch

import felix
from felix.ops.reference.loss import full_logits_loss
from felix.ops.reference.loss import clear_margin, textbook_loss
from felix.testing.loss_cases import make_case
from felix.ops.reference.tolerances import tolerances

OPTIONS = [
    (r, ls, cap) for r in ("mean", "sum", "none") for ls, cap in ((0.0, 0.0), (0.1, 0.0), (0.0, 3.0), (0.2, 4.0))
]
HP = dict(lambda_q=0.3, z_loss=1e-2)


def _truth(h, w, b, t, wl, margin, reduction, ls, cap, upstream=None):
    leaves = [x.double().requires_grad_() for x in (h, w, b)]
    out = textbook_loss(
        leaves[0], leaves[1], t, wl, margin, bias=leaves[2], reduction=reduction, label_smoothing=ls, softcap=cap, **HP
    )
    total = (out[0] * upstream).sum() if upstream is not None else out[0]
    return out, torch.autograd.grad(total, leaves)


def _capped_margin(h, w, b, t, cap):
    """clear_margin on the logits the hinge sees (capped), so no margin sits at the hinge's edge."""
    z = h.double() @ w.double().t() + b.double()
    z = cap * torch.tanh(z / cap) if cap else z
    return clear_margin(z, torch.eye(z.shape[1], dtype=torch.float64), None, t)


@pytest.mark.parametrize("reduction,ls,cap", OPTIONS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype,tol", tolerances("linear_ce_quail/reference").items())
def test_reference_backend_options_match_float64(seed, reduction, ls, cap, dtype, tol):
    h, w, b, t, wl = make_case(seed, 29, 12, 61, "random", dtype=dtype)
    h = h * 3  # logits of a few units: the softcap bites
    margin = _capped_margin(h, w, b, t, cap)
    upstream = (
        torch.rand(29, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        if reduction == "none"
        else None
    )
    truth, tgrads = _truth(h, w, b, t, wl, margin, reduction, ls, cap, upstream)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = felix.linear_ce_quail(
        leaves[0],
        leaves[1],
        t,
        wl,
        margin=margin,
        bias=leaves[2],
        chunk_size=8,
        backend="reference",
        reduction=reduction,
        label_smoothing=ls,
        softcap=cap or None,
        **HP,
    )
    spec = full_logits_loss(
        h, w, t, wl, margin=margin, bias=b, reduction=reduction, label_smoothing=ls, softcap=cap, **HP
    )
    for got in (out, spec):
        for name, g, want in zip(("loss", "ce", "hinge", "z_loss"), got[:4], truth[:4]):
            assert g.shape == want.shape, name
            err = float((g.detach().double() - want.detach()).abs().max())
            assert err <= tol * max(1.0, float(want.detach().abs().max())), (name, err)
        assert int(got.active_hinge_count) == truth[4]
    total = (out.loss * upstream.to(dtype)).sum() if upstream is not None else out.loss
    grads = torch.autograd.grad(total, leaves)
    for name, g, tg in zip(("dh", "dW", "db"), grads, tgrads):
        err = float((g.double() - tg).abs().max()) / max(float(tg.abs().max()), 1e-30)
        assert err <= tol * 10, f"{name}: relative error {err:.3g}"  # 10x: N-term sums of dz rows


def test_options_against_torch_peer(seed):
    """Plain CE (lambda_q = 0) with smoothing and every reduction equals torch's F.cross_entropy on the logits."""
    h, w, _, t, _ = make_case(seed, 33, 8, 40, "none", bias=False)
    z = h @ w.t()
    for reduction in ("mean", "sum", "none"):
        want = torch.nn.functional.cross_entropy(z, t, reduction=reduction, label_smoothing=0.15)
        got = felix.linear_ce_quail(
            h, w, t, None, lambda_q=0.0, reduction=reduction, label_smoothing=0.15, backend="reference"
        ).loss
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), reduction


def test_option_errors():
    h, w, b, t, wl = make_case(1, 6, 4, 10)
    for kwargs, msg in (
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"softcap": -1.0}, "softcap"),
    ):
        with pytest.raises(ValueError, match=msg):
            felix.linear_ce_quail(h, w, t, wl, **kwargs)
