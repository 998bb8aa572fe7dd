"""Spokes in the llama.cpp fork itself: a Felix-LM with trained spokes exported ``--arch felix`` (fused form, F32
spokes) loads in the fork and its logits match PyTorch on the file's own decoded weights, at f32 and at rq4 (the
bounds of tests/ship/test_fork_llamacpp.py); the spokes change the fork's logits; fresh spokes (W_up = 0) compute in the
fork exactly what the hub without spokes computes, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SEED
from export_fixtures import VARIED_TEXTS, make_checkpoint
from test_export_llamacpp import rel_err, top2_margin, torch_logits
from test_fork_llamacpp import FORK_BOUNDS
from test_spokes import trained_like

from felix.model import spokes
from felix.ship.export import export_gguf, model_from_gguf
from felix.ship.llamacpp import LlamaCppModel, available
from felix.model.felix_lm import load_checkpoint, save_checkpoint

ok, why = available("fork")
pytestmark = pytest.mark.skipif(not ok, reason=why)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    directory, model, tok = make_checkpoint(tmp_path_factory.mktemp("spoke-fork") / "hub", seed=SEED)
    return directory, tok


@pytest.fixture(scope="module")
def prompt_ids(hub):
    return hub[1].encode(VARIED_TEXTS[0] + " " + VARIED_TEXTS[4])


def spoked_checkpoint(hub, directory, n_spokes, rank, trained=True):
    model = load_checkpoint(hub[0])
    torch.manual_seed(SEED)  # W_down's init draws from the global generator: fixed, whatever ran before
    spokes.add_spokes(model, n_spokes, rank)
    if trained:
        trained_like(model, SEED, scale=1.0)
    return save_checkpoint(directory, model, hub[1]), model.eval()


@pytest.mark.parametrize("quant", ["f32", "rq4"])
@pytest.mark.parametrize("n_spokes,rank", [(4, 8), (2, 64)])
def test_trained_spokes_load_in_the_fork_and_match_pytorch(hub, prompt_ids, tmp_path, quant, n_spokes, rank):
    directory, model = spoked_checkpoint(hub, tmp_path / "ckpt", n_spokes, rank)
    out = tmp_path / f"spokes-{quant}.gguf"
    export_gguf(directory, out, arch="felix", quant=quant)
    decoded = model_from_gguf(out)
    assert (decoded.cfg.n_spokes, decoded.cfg.spoke_rank) == (n_spokes, rank)
    with LlamaCppModel(out) as llm:
        got = llm.logits(prompt_ids)
    want = torch_logits(decoded, prompt_ids)
    bound, min_top1 = FORK_BOUNDS[quant]
    agree = got.argmax(-1) == want.argmax(-1)
    err = rel_err(got, want)
    assert err <= bound and agree.mean() >= min_top1, f"rel err {err:.3g} (bound {bound}), top-1 {agree.mean():.3f}"
    clear = top2_margin(want) > 2 * bound * np.abs(want).max()
    assert agree[clear].all()
    # the spokes matter: removing them moves PyTorch's logits 10x more than the fork differs from PyTorch
    with torch.no_grad():
        for b in decoded.blk:
            b.spoke.w_up_fused.weight.zero_()
    assert rel_err(torch_logits(decoded, prompt_ids), want) > 10 * err


def test_fresh_spokes_are_an_exact_no_op_in_the_fork(hub, prompt_ids, tmp_path):
    directory, _ = spoked_checkpoint(hub, tmp_path / "fresh", 4, 8, trained=False)
    with_spokes, without = tmp_path / "fresh-spokes.gguf", tmp_path / "hub.gguf"
    export_gguf(directory, with_spokes, arch="felix", quant="rq4")
    export_gguf(hub[0], without, arch="felix", quant="rq4")
    with LlamaCppModel(with_spokes) as a, LlamaCppModel(without) as b:
        np.testing.assert_array_equal(a.logits(prompt_ids), b.logits(prompt_ids))
