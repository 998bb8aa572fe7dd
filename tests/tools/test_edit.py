"""SpliceCore edits (felix/tools/edit/) against independent truths: the constraint equations of the closed form in
float64 (W' k = v on edited keys, W' k_p = W k_p on preserved keys), Eckart-Young for the rank-limited refit, the
model's own predictions before/after, bit-exact restores, and clear errors for bad requests."""

from __future__ import annotations

import pytest
import torch

from felix.cli.main import main
from felix.model import qat
from felix.model.felix_lm import FelixConfig, FelixLM, load_checkpoint, save_checkpoint
from felix.model.splice import list_splices, snapshot_splices
from felix.model.spokes import add_spokes
from felix.model.tokenizer import train_tokenizer
from felix.tools.edit import (
    ConflictError,
    EditError,
    EditRequest,
    RankBudgetError,
    SpliceEditor,
    UntokenisableError,
    fold_splice,
    null_space_projector,
    site_keys,
    splice_product,
    splice_site,
    target_stats,
    tokenize_request,
    widen_splice,
)

TEXTS = [
    f"{who} said that the {what} was {how} on day {d}."
    for d, (who, what, how) in enumerate(
        [
            (w, x, h)
            for w in ("Ana", "Ben", "Chen", "Dara")
            for x in ("cache", "build", "index", "backup")
            for h in ("slow", "fast", "broken", "fine")
        ]
    )
] * 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~50x faster than two on a shared, loaded 2-core machine (no sync stalls)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400)


def make_model(tok, rank=4, seed=0, trained_splice=False):
    torch.manual_seed(seed)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        d_model=64,
        n_head=2,
        n_kv_head=1,
        ffn_hidden=128,
        max_seq_len=64,
        splice_layers=[1],
        splice_rank=rank,
        init_std=0.1,
    )
    model = FelixLM(cfg).eval()
    if trained_splice:
        with torch.no_grad():
            model.blk[1].splice["ffn_down"].b.normal_(0, 0.05)
            model.blk[1].splice["ffn_down"].gate.fill_(0.7)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def preserved(model, tok, n_seqs=4):
    site = splice_site(model)
    seqs = [tok.encode(t) for t in TEXTS[20 : 20 + n_seqs]]  # none holds an edit prompt
    return site_keys(model, site, seqs)


REQS = [
    EditRequest("Ana said that the cache was", " fast"),
    EditRequest("Ben said that the index was", " broken"),
    EditRequest("Dara said that the backup was", " slow"),
]


def predicted(model, tok, req):
    p, t = tokenize_request(tok, model, req)
    return target_stats(model, [(p, t)])[0]


def test_closed_form_satisfies_its_constraints_exactly_in_float64(tok):
    model = make_model(tok, trained_splice=True)
    widen_splice(model, 8)  # S0 (rank 4) stays, 4 ranks free
    kp = preserved(model, tok)
    assert kp.shape[0] < kp.shape[1]  # rank-deficient: the null space is exact
    ed = SpliceEditor(model, tok, preserved_keys=kp, null_tol=1e-10)
    w = ed.weight + ed.s0
    ed.apply(REQS[:2])
    keys, values = ed._all_keys_values()
    dw = ed.solve(keys, values)
    w_new = w + dw
    scale = values.abs().max()
    assert float((keys @ w_new.T - values).abs().max() / scale) < 1e-10  # W' k = v
    out_p = kp @ w.T
    assert float((kp @ w_new.T - out_p).abs().max() / out_p.abs().max()) < 1e-10  # W' k_p = W k_p
    # what was written into A/B (float32) is S0 + dW to float32 rounding, and rank <= the splice's
    prod = splice_product(ed.site)
    assert float((prod - (ed.s0 + dw)).abs().max() / (ed.s0 + dw).abs().max()) < 1e-5
    # the model now says the targets (and did not before)
    for req in REQS[:2]:
        assert predicted(model, tok, req)["top1"]
    assert ed.rank_used() == 2


def test_null_space_projector_is_the_small_eigen_directions():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    p, dim = null_space_projector(k, 1e-10)
    assert dim == 5
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T)
    assert float((k @ p).abs().max()) < 1e-10
    # an independent basis of the null space (SVD of k) spans the same subspace
    v = torch.linalg.svd(k).Vh[3:]
    assert torch.allclose(p, v.T @ v, atol=1e-10)


def test_refit_is_the_eckart_young_optimum(tok):
    model = make_model(tok, rank=2)
    ed = SpliceEditor(model, tok, null_space=False, when_full="refit")
    ed.apply(REQS)  # 3 keys into rank 2
    assert ed.last_fit["refit"] and ed.rank_used() == 2
    keys, values = ed._all_keys_values()
    r = values - keys @ (ed.weight + ed.s0).T
    dw = ed.solve(keys, values)
    err2 = float(((keys @ dw.T) - r).pow(2).sum())
    sv = torch.linalg.svdvals(r)  # rows = keys: residual matrix [M, out]
    assert abs(err2 - float(sv[2:].pow(2).sum())) <= 1e-9 * float(sv.pow(2).sum())


def test_rank_budget_refuses_and_changes_nothing(tok):
    model = make_model(tok, rank=2)
    ed = SpliceEditor(model, tok, null_space=False)
    ed.apply(REQS[:2])
    before = snapshot_splices(model)
    with pytest.raises(RankBudgetError, match="rank 2.*need 3"):
        ed.apply(REQS[2])
    assert all(torch.equal(before[k], v) for k, v in snapshot_splices(model).items())
    assert len(ed.edits) == 2


def test_trained_splice_leaves_no_budget_until_folded(tok):
    model = make_model(tok, rank=2, trained_splice=True)
    ed = SpliceEditor(model, tok, null_space=False)
    assert ed.rank_budget == 0
    with pytest.raises(RankBudgetError, match="fold"):
        ed.apply(REQS[0])
    x = torch.tensor([tok.encode(TEXTS[5])])
    with torch.no_grad():
        ref = model(x).double()
    err = fold_splice(model)
    assert err < 1e-6
    with torch.no_grad():
        assert torch.allclose(model(x).double(), ref, atol=1e-4, rtol=0)
    assert SpliceEditor(model, tok, null_space=False).rank_budget == 2


def test_widen_splice_is_exact_and_adds_budget(tok):
    model = make_model(tok, rank=2, trained_splice=True)
    x = torch.tensor([tok.encode(TEXTS[7])])
    with torch.no_grad():
        ref = model(x)
    widen_splice(model, 6)
    assert list_splices(model)["blk.1.splice.ffn_down.a"][0] == (6, 128)
    with torch.no_grad():  # the zero columns change only float32 summation order
        assert torch.allclose(model(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert SpliceEditor(model, tok, null_space=False).rank_budget == 4


def test_undo_snapshot_and_saved_state(tok):
    model = make_model(tok)
    kp = preserved(model, tok)
    base = snapshot_splices(model)
    ed = SpliceEditor(model, tok, preserved_keys=kp, null_tol=1e-10)
    e0, e1 = ed.apply(REQS[0])[0], ed.apply(REQS[1])[0]
    snap = ed.snapshot()
    ed.apply(REQS[2])
    assert [d["id"] for d in ed.list()] == [0, 1, 2]
    ed.undo(e0.id)
    assert not predicted(model, tok, REQS[0])["top1"]
    assert predicted(model, tok, REQS[1])["top1"] and predicted(model, tok, REQS[2])["top1"]
    manifest, tensors = ed.state()
    again = SpliceEditor.from_state(model, tok, manifest, tensors)
    assert [e.id for e in again.edits] == [1, 2] and again.null_dim == ed.null_dim
    ed.restore(snap)
    assert [e.id for e in ed.edits] == [0, 1]
    assert predicted(model, tok, REQS[0])["top1"] and not predicted(model, tok, REQS[2])["top1"]
    ed.undo(e1.id)
    ed.undo(e0.id)
    assert all(torch.equal(base[k], v) for k, v in snapshot_splices(model).items())  # bit-exact
    with pytest.raises(EditError, match="no applied edit"):
        ed.undo(7)


def test_conflicts_are_refused(tok):
    model = make_model(tok)
    ed = SpliceEditor(model, tok, null_space=False)
    ed.apply(REQS[0])
    with pytest.raises(ConflictError, match="edit 0 already makes"):
        ed.apply(EditRequest(REQS[0].prompt, " slow"))
    with pytest.raises(ConflictError, match="two requests of this batch"):
        ed.apply([EditRequest("Ben said that", " fast"), EditRequest("Ben said that", " slow")])
    # a key the preserved set already pins down exactly: no null-space update can write it
    p, t = tokenize_request(tok, model, REQS[1])
    kp = site_keys(model, ed.site, [p], [[len(p) - 1]])
    ed2 = SpliceEditor(make_model(tok), tok, preserved_keys=kp, null_tol=1e-12)
    with pytest.raises(ConflictError, match="span of the preserved"):
        ed2.apply(REQS[1])


def test_untokenisable_targets_are_refused(tok):
    model = make_model(tok)
    ed = SpliceEditor(model, tok, null_space=False)
    for bad, msg in (("", "empty"), ("<|end|>", "special-token"), (3, "must be a string")):
        with pytest.raises(UntokenisableError, match=msg):
            ed.apply(EditRequest("Ana said", bad))
    small = FelixLM(
        FelixConfig(
            vocab_size=270,
            n_layer=2,
            d_model=64,
            n_head=2,
            n_kv_head=1,
            ffn_hidden=128,
            max_seq_len=64,
            splice_layers=[1],
        )
    )
    merged = next(t for t in (" cache", " backup", " index") if max(tok.encode(t)) >= 270)
    with pytest.raises(UntokenisableError, match="outside the model's vocabulary"):
        SpliceEditor(small, tok, null_space=False).apply(EditRequest("Ana", merged))
    assert ed.edits == []


def test_finetune_baseline_is_constrained_and_undoes_last_first(tok):
    model = make_model(tok)
    base = snapshot_splices(model)
    ed = SpliceEditor(model, tok, method="finetune", ft_eps=0.05, ft_steps=40, ft_lr=0.02)
    e0 = ed.apply(REQS[0])[0]
    ed.apply(REQS[1])
    for k in ("blk.1.splice.ffn_down.a", "blk.1.splice.ffn_down.b"):
        assert float((snapshot_splices(model)[k] - base[k]).abs().max()) <= 0.05 + 1e-7
    with pytest.raises(EditError, match="last-first"):
        ed.undo(e0.id)
    ed.undo(1)
    ed.undo(0)
    assert all(torch.equal(base[k], v) for k, v in snapshot_splices(model).items())
    assert all(p.requires_grad is False for n, p in model.named_parameters() if ".splice." not in n)


def test_cli_edit_list_undo_and_errors(tok, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", make_model(tok), tok)
    assert (
        main(
            [
                "edit",
                str(tmp_path / "ckpt"),
                "--prompt",
                REQS[0].prompt,
                "--target",
                REQS[0].target,
                "--prompt",
                REQS[1].prompt,
                "--target",
                REQS[1].target,
                "--out",
                str(tmp_path / "e1"),
            ]
        )
        == 0
    )
    edited = load_checkpoint(tmp_path / "e1").eval()
    assert predicted(edited, tok, REQS[0])["top1"] and predicted(edited, tok, REQS[1])["top1"]
    assert main(["edit", str(tmp_path / "e1"), "--list"]) == 0
    assert "0  'Ana said that the cache was' -> ' fast'" in capsys.readouterr().out
    assert main(["edit", str(tmp_path / "e1"), "--undo", "0", "--out", str(tmp_path / "e2")]) == 0
    undone = load_checkpoint(tmp_path / "e2").eval()
    assert not predicted(undone, tok, REQS[0])["top1"] and predicted(undone, tok, REQS[1])["top1"]
    capsys.readouterr()
    assert (
        main(
            [
                "edit",
                str(tmp_path / "e2"),
                "--prompt",
                REQS[1].prompt,
                "--target",
                " slow",
                "--out",
                str(tmp_path / "e3"),
            ]
        )
        == 2
    )
    assert "edit 1 already makes" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "e2"), "--prompt", "Ana", "--target", "", "--out", str(tmp_path / "e3")]) == 2
    assert "empty" in capsys.readouterr().err and not (tmp_path / "e3").exists()


def test_edits_compose_with_spokes(tok):
    """A model with trained-like spokes (felix.model.spokes, after each FFN residual): the closed form still holds at the
    projection, and the edits take effect through the spokes downstream."""
    model = make_model(tok, rank=8)
    add_spokes(model, 2, 4)
    with torch.no_grad():
        for blk in model.blk:
            blk.spoke.w_up_fused.weight.normal_(0, 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    assert not any(predicted(model, tok, r)["top1"] for r in REQS[:2])
    ed = SpliceEditor(model, tok, preserved_keys=preserved(model, tok), null_tol=1e-10)
    ed.apply(REQS[:2])
    keys, values = ed._all_keys_values()
    w_new = ed.weight + splice_product(ed.site)
    assert float((keys @ w_new.T - values).abs().max() / values.abs().max()) < 1e-5  # float32 A/B
    assert all(predicted(model, tok, r)["top1"] for r in REQS[:2])


def test_qat_models_are_refused_not_silently_edited(tok, tmp_path, capsys):
    """felix.model.qat composes with edits only by refusal: a QAT checkpoint (edits would be solved on the float weights and
    the QAT record dropped), folding into a fake-quantized weight (the write would land in a recomputed tensor), and
    any model whose matmul inputs are rounded or masked (the closed form's keys would not be the inputs)."""
    model = qat.apply_qat(make_model(tok), "rq4")  # the same edit on this model without qat.json succeeds (CLI test)
    save_checkpoint(tmp_path / "ckpt", model, tok, {qat.QAT_FILE: lambda p: qat.write_qat_config(p, model)})
    assert (
        main(
            [
                "edit",
                str(tmp_path / "ckpt"),
                "--prompt",
                REQS[0].prompt,
                "--target",
                REQS[0].target,
                "--out",
                str(tmp_path / "e1"),
            ]
        )
        == 2
    )
    assert "trained quantization-aware (rq4" in capsys.readouterr().err and not (tmp_path / "e1").exists()
    model = qat.apply_qat(make_model(tok, trained_splice=True), "rq4")
    before = splice_product(splice_site(model)).clone()
    with pytest.raises(EditError, match="re-quantize"):
        fold_splice(model)
    assert torch.equal(splice_product(splice_site(model)), before)
    seamed = qat.apply_qat(make_model(tok), "q8_0", activations="runtime")
    with pytest.raises(EditError, match="activation seam"):
        SpliceEditor(seamed, tok)


def test_ridge_is_the_regularised_least_squares_and_keeps_preserved_keys(tok):
    model = make_model(tok)
    kp = preserved(model, tok)
    ed = SpliceEditor(model, tok, preserved_keys=kp, null_tol=1e-10, ridge=0.05)
    ed.apply(REQS)
    keys, values = ed._all_keys_values()
    dw = ed.solve(keys, values)
    # independent: the input-space normal equations of min |dW P K - R|^2 + lam |dW|^2 (push-through identity)
    pk = ed.projector @ keys.T
    lam = 0.05 * float((pk * pk).sum(0).mean())
    r = (values - keys @ (ed.weight + ed.s0).T).T
    want = torch.linalg.solve(pk @ pk.T + lam * torch.eye(pk.shape[0], dtype=torch.float64), pk @ r.T).T
    assert float((dw - want).abs().max() / want.abs().max()) < 1e-9
    assert float((kp @ dw.T).abs().max()) < 1e-10 * float((kp @ ed.weight.T).abs().max())
