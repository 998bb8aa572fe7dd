"""felix.linear_ce_quail (reference backend = the chunked torch path) and the spec, against textbook
float64 math (felix.ops.reference.loss.textbook_loss): loss parts and gradients of h, W, bias; exact margins and ties; huge
logits; bf16; clear errors; torch.library well-formedness; the whitelist helper."""

import pytest
import torch

import felix
from felix.ops import loss as loss_ops
from felix.core.quail import build_whitelist, describe_whitelist
from felix.ops.reference.loss import full_logits_loss
from felix.ops.reference.loss import clear_margin, textbook_loss
from felix.ops.reference.tolerances import tolerance, tolerances
from felix.testing.loss_cases import cross_tile_tie_case, exact_case, make_case

HUGE_LOGITS_TOL = tolerance("linear_ce_quail/huge_logits", torch.float32)

HP = dict(margin=2.0, lambda_q=0.3, z_loss=1e-2)


def run_felix(h, w, b, t, wl, backend="reference", chunk_size=None, **hp):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w)] + (
        [b.detach().clone().requires_grad_()] if b is not None else []
    )
    out = felix.linear_ce_quail(
        leaves[0],
        leaves[1],
        t,
        wl,
        bias=leaves[2] if b is not None else None,
        chunk_size=chunk_size,
        backend=backend,
        **hp,
    )
    grads = torch.autograd.grad(out.loss, leaves)
    return out, grads


def run_truth(h, w, b, t, wl, **hp):
    leaves = [x.detach().double().requires_grad_() for x in (h, w)] + (
        [b.detach().double().requires_grad_()] if b is not None else []
    )
    parts = textbook_loss(
        leaves[0], leaves[1], t, wl, hp["margin"], hp["lambda_q"], hp["z_loss"], leaves[2] if b is not None else None
    )
    return parts, torch.autograd.grad(parts[0], leaves)


def assert_close(out, grads, truth, tgrads, tol):
    loss, ce, hinge, zl, active, mean_margin = (x.detach() if isinstance(x, torch.Tensor) else x for x in truth)
    for name, got, want in (
        ("loss", out.loss.detach(), loss),
        ("ce", out.ce, ce),
        ("hinge", out.hinge, hinge),
        ("z_loss", out.z_loss, zl),
        ("mean_margin", out.mean_margin, mean_margin),
    ):
        assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want))), (
            f"{name}: {float(got)} vs {float(want)}"
        )
    assert int(out.active_hinge_count) == active
    for name, g, w in zip(("dh", "dW", "dbias"), grads, tgrads):
        err = float((g.double() - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize(
    "n,d,v,whitelist,bias,chunk",
    [
        (37, 16, 53, "random", True, 8),  # ragged chunks, V not a multiple of anything
        (37, 16, 53, "none", False, 1000),  # one chunk, no hinge
        (29, 24, 301, "all", True, 5),
        (16, 8, 31, "empty", True, 16),
    ],
)
@pytest.mark.parametrize("dtype,tol", tolerances("linear_ce_quail/reference").items())
def test_reference_backend_matches_float64_truth(seed, n, d, v, whitelist, bias, chunk, dtype, tol):
    h, w, b, t, wl = make_case(seed, n, d, v, whitelist, bias=bias, dtype=dtype)
    hp = HP | dict(margin=clear_margin(h, w, b, t))
    out, grads = run_felix(h, w, b, t, wl, chunk_size=chunk, **hp)
    truth, tgrads = run_truth(h, w, b, t, wl, **hp)
    assert_close(out, grads, truth, tgrads, tol)


def test_the_spec_matches_textbook_math(seed):
    h, w, b, t, wl = make_case(seed, 23, 12, 41, "random", dtype=torch.float64)
    spec = full_logits_loss(h, w, t, wl, bias=b, **HP)
    truth = textbook_loss(h, w, t, wl, HP["margin"], HP["lambda_q"], HP["z_loss"], b)
    for got, want in zip(spec, truth):
        assert abs(float(got) - float(want)) < 1e-12


def test_exact_margins_and_ties():
    h, w, t, wl = exact_case()
    out, (dh, dw) = run_felix(h.double(), w.double(), None, t, wl, margin=2.0, lambda_q=1.0, z_loss=0.0)
    truth, (th, tw) = run_truth(h, w, None, t, wl, margin=2.0, lambda_q=1.0, z_loss=0.0)
    # margins 0, 2, 7, 0.5, 0: hinge = (2 + 0 + 0 + 1.5 + 2) / 5; active = rows 0, 3, 4
    assert float(out.hinge) == pytest.approx(5.5 / 5, abs=1e-12)
    assert int(out.active_hinge_count) == 3
    assert float(out.mean_margin) == pytest.approx(9.5 / 5, abs=1e-12)
    assert_close(out, (dh, dw), truth, (th, tw), 1e-12)
    # dz = dL/dlogits = dW^T here; the row at exactly the margin gets no hinge push, the tie pushes token 1
    ce_only, (_, dw_ce) = run_felix(h.double(), w.double(), None, t, wl, margin=2.0, lambda_q=0.0, z_loss=0.0)
    push = (dw - dw_ce).t()  # [N, V]
    assert torch.allclose(push[1], torch.zeros(4, dtype=torch.float64), atol=1e-15)
    assert push[0, 1] == pytest.approx(1 / 5) and push[0, 0] == pytest.approx(-1 / 5)
    assert push[4, 0] == pytest.approx(1 / 5) and push[4, 3] == pytest.approx(-1 / 5)  # first index wins ties


def test_ties_far_apart_push_the_first_best_other():
    h, w, t, wl = cross_tile_tie_case()
    out, grads = run_felix(h.double(), w.double(), None, t, wl, chunk_size=2, margin=2.0, lambda_q=1.0, z_loss=0.0)
    truth, tgrads = run_truth(h, w, None, t, wl, margin=2.0, lambda_q=1.0, z_loss=0.0)
    assert_close(out, grads, truth, tgrads, 1e-12)


def test_huge_logits_do_not_overflow(seed):
    h, w, b, t, wl = make_case(seed, 19, 8, 37, "random", scale=3e3)  # logits ~ 1e4
    hp = HP | dict(margin=clear_margin(h, w, b, t, gap=1.0))
    out, grads = run_felix(h, w, b, t, wl, chunk_size=6, **hp)
    assert all(torch.isfinite(x).all() for x in (out.loss, *grads))
    truth, tgrads = run_truth(h, w, b, t, wl, **hp)
    assert_close(out, grads, truth, tgrads, HUGE_LOGITS_TOL)


def test_bf16_and_fp16_inputs_compute_in_fp32(seed):
    for dtype in (torch.bfloat16, torch.float16):
        h, w, b, t, wl = make_case(seed, 21, 16, 45, "random", dtype=dtype)
        hp = HP | dict(margin=clear_margin(h, w, b, t))
        out, grads = run_felix(h, w, b, t, wl, chunk_size=7, **hp)
        assert out.loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        truth, tgrads = run_truth(h, w, b, t, wl, **hp)  # on the same (rounded) inputs, in float64
        assert_close(out, grads, truth, tgrads, 2e-2)


def test_no_grad_gives_the_same_parts_without_gradients(seed):
    h, w, b, t, wl = make_case(seed, 17, 8, 29)
    with torch.no_grad():
        out = felix.linear_ce_quail(h, w, t, wl, bias=b, **HP)
    truth, _ = run_truth(h, w, b, t, wl, **HP)
    assert float(out.loss) == pytest.approx(float(truth[0].detach()), rel=1e-5)


def test_whitelist_as_ids_equals_mask(seed):
    h, w, b, t, wl = make_case(seed, 17, 8, 29)
    by_mask = felix.linear_ce_quail(h, w, t, wl, bias=b, **HP)
    by_ids = felix.linear_ce_quail(h, w, t, wl.nonzero()[:, 0].tolist(), bias=b, **HP)
    assert torch.equal(by_mask.loss, by_ids.loss)


def test_bad_input_is_refused_clearly(gen):
    h, w, b, t, wl = make_case(1, 6, 4, 10)
    cases = [
        (dict(h=h[0]), r"h must be a 2-D \[N, d\] tensor"),
        (dict(weight=w[:, :3]), r"hidden sizes differ"),
        (dict(weight=w.double()), "h and weight must share a float dtype"),
        (dict(targets=t[:4]), r"targets must be a \[N\] = \[6\] tensor"),
        (dict(targets=t.float()), "targets must be int64 or int32"),
        (
            dict(targets=torch.tensor([0, 1, 2, 10, -100, 3])),
            r"target 10 at position 3 is outside the vocabulary \[0, 10\)",
        ),
        (dict(targets=torch.tensor([0, 1, 2, -1, -100, 3])), r"target -1 at position 3 is outside"),
        (dict(whitelist=torch.ones(9, dtype=torch.bool)), r"whitelist mask must have shape \[10\]"),
        (dict(whitelist=[3, 12]), r"whitelist token ids must lie in \[0, 10\)"),
        (dict(whitelist=torch.rand(10)), "bool mask"),
        (dict(bias=torch.zeros(9)), r"bias must be a \[10\] tensor"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(backend="nope"), "unknown backend"),
    ]
    for override, msg in cases:
        kw = dict(h=h, weight=w, targets=t, whitelist=wl, bias=b) | override
        with pytest.raises(ValueError, match=msg):
            felix.linear_ce_quail(**kw)


def test_triton_backend_on_cpu_needs_the_interpreter():
    h, w, b, t, wl = make_case(1, 6, 4, 10)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        felix.linear_ce_quail(h, w, t, wl, backend="triton")


def test_custom_op_is_well_formed(seed):
    h, w, b, t, wl = make_case(seed, 13, 8, 21)
    args = (
        h.requires_grad_(),
        w.requires_grad_(),
        t,
        wl,
        b.requires_grad_(),
        2.0,
        0.3,
        0.01,
        -100,
        5,
        torch.float32,
        True,
        "reference",
    )
    torch.library.opcheck(loss_ops._linear_ce_quail_op, args)


def test_torch_compile_traces_callers(seed):
    h, w, b, t, wl = make_case(seed, 13, 8, 21)
    h.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h):
        return felix.linear_ce_quail(h, w, t, wl, bias=b, chunk_size=4, backend="reference", **HP).loss

    got = step(h)
    got.backward()
    truth, (th, _, _) = run_truth(h, w, b, t, wl, **HP)
    assert float(got.detach()) == pytest.approx(float(truth[0].detach()), rel=1e-5)
    assert torch.allclose(h.grad.double(), th, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64(seed):
    h, w, b, t, wl = make_case(seed, 5, 3, 7, "all", dtype=torch.float64)
    fn = lambda h, w, b: felix.linear_ce_quail(h, w, t, wl, bias=b, chunk_size=2, **HP).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (h, w, b)))


def test_module_carries_the_whitelist(seed):
    h, w, b, t, wl = make_case(seed, 11, 8, 19)
    mod = loss_ops.LinearCEQuail(wl, margin=2.0, lambda_q=0.3, z_loss=0.01)
    assert "whitelisted=" in repr(mod)
    assert torch.equal(mod(h, w, t, bias=b).loss, felix.linear_ce_quail(h, w, t, wl, bias=b, **HP).loss)


# ----------------------------------------------------------------------------- whitelist helper
@pytest.fixture(scope="module")
def tiny_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        '{"gist": "a cat", "concepts": ["cat", "mat"], "salience": 0.5}',
        '{"has_principle": false, "title": null, "confidence": 0.1}',
        "The cat sat on the mat. I cannot find a principle here.",
    ] * 20
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return tok


def test_whitelist_marks_json_structure_fields_and_refusals(tiny_bpe):
    mask = build_whitelist(tiny_bpe, strings=["has_principle", "concepts", "I cannot"], vocab_size=320)
    assert mask.shape == (320,) and mask.dtype == torch.bool and not mask[300:].any()
    for piece in ["{", "}", "[", "]", ":", ",", '"', "true", "false", "null", "has_principle", "concepts", "I cannot"]:
        ids = tiny_bpe.encode(piece).ids
        assert ids and all(mask[i] for i in ids), piece
    cat = tiny_bpe.encode("cat").ids
    assert not any(mask[i] for i in cat), "plain words are not whitelisted"
    assert "tokens whitelisted" in describe_whitelist(tiny_bpe, mask)


def test_whitelist_patterns_and_size_check(tiny_bpe):
    mask = build_whitelist(tiny_bpe, patterns=[r"at$"], structure_chars="", literals=())
    marked = [tiny_bpe.decode([i]) for i in mask.nonzero()[:, 0].tolist()]
    assert marked and all(text.endswith("at") for text in marked)
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocabulary"):
        build_whitelist(tiny_bpe, vocab_size=10)
