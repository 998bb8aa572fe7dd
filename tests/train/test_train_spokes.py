"""`felix train` with spokes: from scratch (--spokes N --spoke-rank R), and the seed's workflow (a trained hub
frozen, only the spokes trained: --train-only spokes --init-from CKPT) with optimizer state for the spokes alone,
checkpoints that carry the spokes (and spokes.safetensors tied to the hub), exact resume, and refusals."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_run

from felix.model import spokes
from felix.model.felix_lm import load_checkpoint
from felix.train.runs import load_trainer_state
from felix.train.loop import STATE_FILE, STATE_TENSORS_FILE, train

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    train(tiny_run(tmp, "hub", steps=8, n_records=60, eval_every=8), **QUIET)
    return tmp / "hub" / "checkpoint"


def spoke_run(tmp_path, name, hub_dir, **kw):
    base = dict(
        init_from=str(hub_dir),
        train_only="spokes",
        spokes=4,
        spoke_rank=8,
        steps=10,
        warmup_steps=2,
        eval_every=5,
        n_records=60,
        prose=False,
        lr=1e-2,
    )
    return tiny_run(tmp_path, name, **{**base, **kw})


def test_spokes_train_on_a_frozen_hub_and_resume_exactly(tmp_path, hub_dir):
    hub = load_checkpoint(hub_dir)
    full = train(spoke_run(tmp_path, "full", hub_dir), **QUIET)
    ckpt = tmp_path / "full" / "checkpoint"
    trained = load_checkpoint(ckpt)
    assert (trained.cfg.n_spokes, trained.cfg.spoke_rank) == (4, 8)
    # the hub is bit-identical, the spokes moved (W_up away from its zero init)
    for k, v in hub.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k
    assert all(b.spoke.w_up_fused.weight.abs().max() > 0 for b in trained.blk)
    x = torch.randint(0, hub.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (trained(x) - hub(x)).abs().max() > 1e-3  # the spokes change the logits
    # optimizer state only for what trains
    state = load_trainer_state(ckpt)
    n_state = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    assert n_state == sum(v.numel() for k, v in trained.state_dict().items() if ".spoke." in k)
    assert state["hub_fingerprint"] == spokes.hub_fingerprint(hub)
    # the spoke file re-attaches to the hub
    spokes.load_spokes(hub, ckpt / spokes.SPOKES_FILE)
    with torch.no_grad():
        assert torch.equal(hub(x), trained(x))
    # exact resume
    cfg = spoke_run(tmp_path, "split", hub_dir)
    train(cfg, stop_at=4, **QUIET)
    resumed = train(cfg, resume=True, **QUIET)
    assert resumed.step_losses == full.step_losses
    assert full.step_losses[-1] < full.step_losses[0]


def test_spokes_from_scratch_and_refusals(tmp_path, hub_dir):
    run = train(
        tiny_run(tmp_path, "scratch", steps=4, warmup_steps=1, eval_every=4, n_records=40, spokes=2, spoke_rank=4),
        **QUIET,
    )
    m = load_checkpoint(run.out_dir / "checkpoint")
    assert (m.cfg.n_spokes, m.cfg.spoke_rank) == (2, 4) and all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="--init-from"):
        train(tiny_run(tmp_path, "x", train_only="spokes"), **QUIET)
    with pytest.raises(ValueError, match="train_only"):
        tiny_run(tmp_path, "y", train_only="hub")
    with pytest.raises(ValueError, match="> 256"):
        train(spoke_run(tmp_path, "z", hub_dir, spokes=8, spoke_rank=64), **QUIET)
    # resuming onto a hub that changed under the spokes is refused
    cfg = spoke_run(tmp_path, "tamper", hub_dir, steps=4, eval_every=2)
    train(cfg, stop_at=2, **QUIET)
    from felix.model.felix_lm import save_checkpoint

    ck = tmp_path / "tamper" / "checkpoint"
    model = load_checkpoint(ck)
    with torch.no_grad():
        model.blk[0].attn_q.weight[0, 0] += 1.0
    import shutil

    keep = {name: (ck / name).read_bytes() for name in (STATE_FILE, STATE_TENSORS_FILE)}
    save_checkpoint(
        ck.resolve(),
        model,
        None,
        {
            **{name: (lambda p, b=b: p.write_bytes(b)) for name, b in keep.items()},
            "tokenizer.json": lambda p: shutil.copy(hub_dir / "tokenizer.json", p),
        },
    )
    with pytest.raises(ValueError, match="hub fingerprint"):
        train(cfg, resume=True, **QUIET)
