"""felix.tools.prune: structured pruning checked against independent truths.

* Pruning to the source's own shape is the identity (same tensors, equal logits).
* A pruned model equals the SOURCE model with the pruned groups zeroed by this test (dropped layers: their
  residual writers zeroed; dropped heads / value dims: attn_output columns; dropped RoPE pairs: q rows; FFN
  channels: ffn_down columns; residual channels: every writer's rows and the embedding's columns; splices
  with their projections). That is exactly computable, RMSNorm's width and the attention scale included, so
  the comparison is at float32 rounding.
* The mask mechanism with binary masks equals the same zeroed source (the scores' forward pass is the right one).
* Bad targets are refused with a message naming the problem.

Tolerance: float32 forwards of a 3-layer model with logits O(1-10); the two sides sum in different orders
(and the pruned side scales q by sqrt(1/2) and the norms by sqrt(2)), so they differ by a few float32 ulps
per op: 1e-5 of max |logit| is ~100 ulps. Each comparison also checks the unzeroed source is far outside it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SEED

from felix.tools import prune as P
from felix.model.felix_lm import FelixConfig, FelixLM, load_checkpoint, save_checkpoint

TOL = 1e-5


def _source(tie: bool = True, seed: int = SEED) -> FelixLM:
    """A random source whose every tensor is nonzero: splices (B != 0, gates != 1) on every projection kind of
    layers 0 and 2, norms != 1."""
    cfg = FelixConfig(
        vocab_size=97,
        n_layer=3,
        d_model=256,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=192,
        max_seq_len=32,
        tie_embeddings=tie,
        splice_layers=[0, 2],
        splice_rank=4,
        init_std=0.08,
        splice_projections=["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
    )
    g = torch.Generator().manual_seed(seed)
    model = FelixLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(".gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tokens(model, seed=SEED):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, model.cfg.vocab_size, (2, 24), generator=g)


def _zero_cols(sd, name, keep):
    drop = sorted(set(range(sd[name].shape[1])) - set(keep))
    sd[name][:, drop] = 0


def _zero_rows(sd, name, keep):
    drop = sorted(set(range(sd[name].shape[0])) - set(keep))
    sd[name][drop] = 0


def zeroed_source(model: FelixLM, plan: P.PrunePlan) -> FelixLM:
    """The independent truth: the source with every pruned group zeroed, written from the plan's indices."""
    cfg = model.cfg
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    hd = cfg.head_dim
    splice = lambda i, proj, part: f"blk.{i}.splice.{proj}.{part}"  # noqa: E731
    kept = {lp.source_layer: lp for lp in plan.layers}
    for i in range(cfg.n_layer):
        writers = ("attn_output", "ffn_down")
        if i not in kept:  # the block adds nothing to the residual stream
            for proj in writers:
                sd[f"blk.{i}.{proj}.weight"].zero_()
                if splice(i, proj, "b") in sd:
                    sd[splice(i, proj, "b")].zero_()
            continue
        lp = kept[i]
        pair_dims = [2 * p + j for p in plan.qk_pairs for j in (0, 1)]
        q_keep = [h * hd + d for h in range(cfg.n_head) for d in pair_dims]
        _zero_rows(sd, f"blk.{i}.attn_q.weight", q_keep)
        if splice(i, "attn_q", "b") in sd:
            _zero_rows(sd, splice(i, "attn_q", "b"), q_keep)
        o_keep = [h * hd + d for hs, vd in zip(lp.heads, lp.v_dims) for h in hs for d in vd]
        _zero_cols(sd, f"blk.{i}.attn_output.weight", o_keep)
        _zero_cols(sd, f"blk.{i}.ffn_down.weight", lp.ffn)
        for proj, keep in (("attn_output", o_keep), ("ffn_down", lp.ffn)):
            if splice(i, proj, "a") in sd:
                _zero_cols(sd, splice(i, proj, "a"), keep)
        for proj in writers:  # residual channels: no layer writes a dropped one
            _zero_rows(sd, f"blk.{i}.{proj}.weight", plan.hidden)
            if splice(i, proj, "b") in sd:
                _zero_rows(sd, splice(i, proj, "b"), plan.hidden)
    _zero_cols(sd, "token_embd.weight", plan.hidden)
    out = FelixLM(cfg)
    out.load_state_dict(sd)
    return out.eval()


def _random_plan(cfg, target, seed=SEED):
    g = torch.Generator().manual_seed(seed + 2)
    scores = {k: torch.rand(s, generator=g) for k, s in P.mask_shapes(cfg).items()}
    return P.select(cfg, target, scores, "random")


def _close(got, want, far_from=None):
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= TOL * scale, f"max |diff| {err:.3g} > {TOL} x max |logit| {scale:.3g}"
    if far_from is not None:  # the comparison can fail: the source itself is far outside the bound
        assert float((far_from - want).abs().max()) > 100 * TOL * scale


def test_same_shape_is_the_identity():
    model = _source()
    pruned = P.apply_plan(model, P.identity_plan(model.cfg))
    assert pruned.cfg == model.cfg
    for name, t in model.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], t), name
    x = _tokens(model)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


# (n_layer, n_head, n_kv_head, ffn_hidden, d_model); Felix ties head_dim = d_model / n_head (source 64): heads,
# kv groups and layers with head_dim kept; head_dim halved (RoPE stride 2); the GQA ratio lowered (4:2 -> 2:2);
# everything at once (head_dim 32).
TARGETS = [(2, 2, 1, 192, 128), (3, 4, 2, 96, 128), (2, 2, 2, 128, 128), (2, 2, 1, 100, 64)]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shape", TARGETS, ids=lambda s: "x".join(map(str, s)))
def test_pruned_model_equals_source_with_groups_zeroed(shape, tie):
    model = _source(tie)
    target = P.Target(*shape)
    plan = _random_plan(model.cfg, target)
    pruned = P.apply_plan(model, plan)
    assert (
        pruned.cfg.n_layer,
        pruned.cfg.n_head,
        pruned.cfg.n_kv_head,
        pruned.cfg.ffn_hidden,
        pruned.cfg.d_model,
    ) == shape
    truth = zeroed_source(model, plan)
    x = _tokens(model)
    with torch.no_grad():
        _close(pruned(x), truth(x), far_from=model(x))


@pytest.mark.parametrize("shape", [TARGETS[0], TARGETS[2], (2, 2, 1, 100, 128)], ids=lambda s: "x".join(map(str, s)))
def test_binary_masks_compute_the_zeroed_source(shape):
    """The scoring forward pass (MaskedForward) with 0/1 masks of a plan is the zeroed source too."""
    model = _source()
    cfg = model.cfg
    plan = _random_plan(cfg, P.Target(*shape))  # head_dim kept: RoPE pairs are fixed by RoPE, not masked
    masks = {k: torch.zeros(s) for k, s in P.mask_shapes(cfg).items()}
    masks["hidden"][plan.hidden] = 1
    ratio = cfg.n_head // cfg.n_kv_head
    masks["v_dim"][:] = 0
    for lp in plan.layers:
        i = lp.source_layer
        masks["layer"][i] = 1
        masks["kv_head"][i, lp.kv_heads] = 1
        masks["head"][i, [h for hs in lp.heads for h in hs]] = 1
        for g, vd in zip(lp.kv_heads, lp.v_dims):
            masks["v_dim"][i, g, vd] = 1
        masks["ffn"][i, lp.ffn] = 1
    assert masks["head"].view(cfg.n_layer, cfg.n_kv_head, ratio).sum(-1).max() <= ratio
    x = _tokens(model)
    with torch.no_grad():
        with P.MaskedForward(model, masks):
            got = model(x)
        want = zeroed_source(model, plan)(x)
        # hidden masks zero the norm inputs, the zeroed source zeroes the stream: same values, same norm width
        _close(got, want, far_from=model(x))
    assert model.activation_rounding is None  # the seam is given back


@pytest.mark.parametrize("method", P.METHODS)
def test_scores_select_real_groups_and_prune_to_target(method):
    model = _source()
    g = torch.Generator().manual_seed(SEED + 3)
    batches = [
        (x, y)
        for x, y in [(t[:, :-1], t[:, 1:]) for t in [torch.randint(0, 97, (2, 17), generator=g) for _ in range(3)]]
    ]
    target = P.Target(2, 2, 1, 96, 128)
    result = P.prune(model, target, method, batches, hc_steps=10)
    assert result.pruned_params < result.source_params
    assert {k: tuple(v.shape) for k, v in result.scores.items()} == P.mask_shapes(model.cfg)
    assert all(torch.isfinite(v).all() for v in result.scores.values())
    # the plan keeps the highest-scoring layer(s), and the pruned model is the zeroed source
    best = sorted(range(3), key=lambda i: -float(result.scores["layer"][i]))[:2]
    assert sorted(best) == [lp.source_layer for lp in result.plan.layers]
    x = _tokens(model)
    with torch.no_grad():
        _close(result.model(x), zeroed_source(model, result.plan)(x))
    assert all(p.requires_grad for p in model.parameters())


def test_taylor_scores_are_the_loss_gradient_of_the_masks():
    """|dL/dz| equals the finite-difference derivative of the calibration loss in one group's mask."""
    model = _source()
    g = torch.Generator().manual_seed(SEED + 4)
    t = torch.randint(0, 97, (2, 17), generator=g)
    batch = (t[:, :-1], t[:, 1:])
    scores = P.taylor_scores(model, [batch])
    for kind, index in (("ffn", (1, 5)), ("head", (0, 3)), ("hidden", (7,)), ("layer", (2,))):
        losses = []
        for eps in (1e-2, -1e-2):
            masks = P.ones_masks(model.cfg)
            masks[kind][index] += eps
            with torch.no_grad(), P.MaskedForward(model, masks):
                losses.append(float(model.loss(*batch).ce))
        fd = abs(losses[0] - losses[1]) / 2e-2
        assert fd == pytest.approx(float(scores[kind][index]), rel=2e-2, abs=1e-4), kind


def test_bad_targets_are_clear_errors():
    cfg = _source().cfg  # 3 layers x 256, 4:2 heads of 64, FFN 192
    with pytest.raises(P.PruneError, match="n_layer 4 is larger than the source's 3"):
        P.target_from(cfg, n_layer=4)
    with pytest.raises(P.PruneError, match="d_model 512 is larger"):
        P.target_from(cfg, d_model=512)
    with pytest.raises(P.PruneError, match="head_dim 128 .* is larger than the source's 64"):
        P.target_from(cfg, n_head=2, n_kv_head=1)
    with pytest.raises(P.PruneError, match="n_head 3 does not divide target d_model 256"):
        P.target_from(cfg, n_head=3, n_kv_head=1)
    with pytest.raises(P.PruneError, match="head_dim 48 .* is not one felix.attention supports"):
        P.target_from(cfg, d_model=96, n_head=2, n_kv_head=1)
    with pytest.raises(P.PruneError, match="head_dim 16 .* is not one felix.attention supports"):
        P.target_from(cfg, d_model=64)
    with pytest.raises(P.PruneError, match="n_kv_head 3 does not divide target n_head 4"):
        P.target_from(FelixConfig(n_head=4, n_kv_head=4), n_kv_head=3)
    with pytest.raises(P.PruneError, match="GQA ratio cannot be kept.*4 query heads per kv head"):
        P.target_from(cfg, n_kv_head=1)
    with pytest.raises(P.PruneError, match="preset 'tiny' has n_layer 4"):
        P.target_from(FelixConfig(n_layer=2, d_model=256, ffn_hidden=512), preset="tiny")
    with pytest.raises(P.PruneError, match="unknown preset"):
        P.target_from(cfg, preset="huge")
    with pytest.raises(P.PruneError, match="unknown pruning method"):
        P.prune(_source(), P.Target(3, 4, 2, 192, 256), "magnitude", [None])
    with pytest.raises(P.PruneError, match="the source has spokes"):  # refused before any scoring work
        P.target_from(FelixConfig(n_layer=2, d_model=256, ffn_hidden=512, n_spokes=2), ffn_hidden=256)


def test_prune_checkpoint_writes_a_loadable_checkpoint(tmp_path):
    """`felix prune` end to end on a saved checkpoint (built-in calibration text) -> a checkpoint that
    load_checkpoint rebuilds, with its plan; `felix train --init-from` continues from it."""
    from felix.cli.main import main
    from felix.model.tokenizer import train_tokenizer
    from felix.data.corpus import builtin_corpus

    tok = train_tokenizer(builtin_corpus(50, seed=0)[:200], 300)
    model = _source()
    cfg = FelixConfig(**{**json.loads(model.cfg.to_json()), "vocab_size": tok.vocab_size})
    model = FelixLM(cfg)
    save_checkpoint(tmp_path / "src", model, tok)
    code = main(
        [
            "prune",
            str(tmp_path / "src"),
            str(tmp_path / "pruned"),
            "--layers",
            "2",
            "--d-model",
            "128",
            "--ffn-hidden",
            "96",
            "--calib-batches",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
        ]
    )
    assert code == 0
    pruned = load_checkpoint(tmp_path / "pruned")
    assert (pruned.cfg.n_layer, pruned.cfg.d_model, pruned.cfg.ffn_hidden, pruned.cfg.head_dim) == (2, 128, 96, 32)
    assert pruned.cfg.norm_eps == pytest.approx(2 * cfg.norm_eps)
    plan = json.loads((tmp_path / "pruned" / P.PLAN_FILE).read_text())
    assert plan["plan"]["method"] == "taylor" and len(plan["plan"]["hidden"]) == 128
    assert main(["prune", str(tmp_path / "src"), str(tmp_path / "bad"), "--layers", "9"]) == 2
    assert not (tmp_path / "bad").exists()
    from felix.train.loop import TrainConfig, train

    res = train(
        TrainConfig(
            init_from=str(tmp_path / "pruned"),
            out_dir=str(tmp_path / "rec"),
            steps=2,
            warmup_steps=1,
            batch_size=2,
            seq_len=16,
            eval_every=2,
            eval_batches=1,
            n_records=20,
        ),
        log=lambda *_: None,
    )
    assert math.isfinite(res.metrics[-1]["val_ce"])
    assert load_checkpoint(tmp_path / "rec" / "checkpoint").cfg == pruned.cfg
