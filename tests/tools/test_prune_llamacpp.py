"""A pruned checkpoint exports and runs in llama.cpp like any other (stock `llama` arch and the fork's `felix` arch):
llama.cpp's logits on the f32 export match PyTorch's pruned model within the exporter tests' f32 bound, with top-1
agreement wherever PyTorch's margin is clear. The target halves d_model and head_dim (4 heads of 64 -> 4 of 32), so
the file carries the rescaled norm epsilon and the RoPE-strided q/k rows; the source's splices ride along."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SEED
from export_fixtures import VARIED_TEXTS, make_checkpoint
from test_export_llamacpp import BOUNDS, rel_err, top2_margin, torch_logits

from felix.ship.export import export_gguf
from felix.ship.llamacpp import LlamaCppModel, available
from felix.model.felix_lm import load_checkpoint
from felix.tools.prune import prune_checkpoint


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    make_checkpoint(root / "source", seed=SEED, train_steps=30)
    result = prune_checkpoint(
        root / "source",
        root / "pruned",
        method="taylor",
        calib_batches=2,
        batch_size=4,
        seq_len=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=256,
        d_model=128,
    )
    assert result.model.cfg.head_dim == 32 and result.model.cfg.resolved_splice_layers() == [1]
    return root / "pruned"


@pytest.mark.parametrize("arch,runtime", [("llama", "stock"), ("felix", "fork")])
def test_pruned_checkpoint_runs_in_llamacpp(pruned, tmp_path, arch, runtime):
    ok, why = available(runtime)
    if not ok:
        pytest.skip(why)
    from felix.model.tokenizer import Tokenizer

    ids = Tokenizer.load(pruned).encode(VARIED_TEXTS[0] + " " + VARIED_TEXTS[3])
    out = tmp_path / f"pruned-{arch}.gguf"
    export_gguf(pruned, out, arch=arch, quant="f32")
    with LlamaCppModel(out) as llm:
        assert llm.runtime == runtime
        got = llm.logits(ids)
    want = torch_logits(load_checkpoint(pruned).eval(), ids)
    bound, min_top1 = BOUNDS["f32"]
    agree = got.argmax(-1) == want.argmax(-1)
    assert rel_err(got, want) <= bound and agree.mean() >= min_top1, (rel_err(got, want), agree.mean())
    clear = top2_margin(want) > 2 * bound * np.abs(want).max()
    assert agree[clear].all()
