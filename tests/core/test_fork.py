"""felix.core.fork without the fork: the loader rules Felix checks before writing a felix-arch file (every rule can
fail, and says which), and the no-op spokes the exporter writes for a model without spokes.
The same files loading in the fork itself is tests/ship/test_fork_llamacpp.py."""

from __future__ import annotations

import pytest
import torch
from conftest import SEED
from export_fixtures import make_checkpoint

from felix.core import fork
from felix.ship.export import export_gguf
from felix.ship.gguf_file import metadata, open_gguf, torch_shape
from felix.model.felix_lm import preset
from felix.ops.spoke import spoke_residual

CFG = preset("tiny-256")
META = dict(zip((fork.NUM_SPOKES_KEY, fork.SPOKE_RANK_KEY), fork.NOOP_SPOKES))


def good_shapes(cfg=CFG, n_spokes=1, rank=1, fused=True):
    return {**fork.hub_shapes(cfg), **fork.spoke_shapes(cfg.n_layer, cfg.d_model, n_spokes, rank, fused)}


@pytest.mark.parametrize("fused", [True, False])
def test_a_complete_file_passes(fused):
    fork.check_loadable(
        good_shapes(n_spokes=4, rank=8, fused=fused), {fork.NUM_SPOKES_KEY: 4, fork.SPOKE_RANK_KEY: 8}, CFG
    )


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda s, m: s.pop("blk.1.spoke.norm.weight"), "missing tensor.*blk.1.spoke.norm.weight"),
        (lambda s, m: s.pop("blk.0.spoke.gate_bias"), "missing tensor.*blk.0.spoke.gate_bias"),
        (lambda s, m: s.update({"blk.1.splice.ffn_down.a": (8, 512)}), "wrong number of tensors.*splice"),
        (lambda s, m: s.update({"blk.0.spoke.w_up_fused.weight": (256, 2)}), "mis-shaped.*w_up_fused"),
        (lambda s, m: m.pop(fork.NUM_SPOKES_KEY), "felix.num_spokes is missing"),
        (lambda s, m: m.update({fork.SPOKE_RANK_KEY: 0}), "must be >= 1"),
        (lambda s, m: s.pop("output_norm.weight"), "missing tensor.*output_norm"),
    ],
)
def test_every_loader_rule_refuses_with_its_reason(break_it, message):
    shapes, meta = good_shapes(), dict(META)
    break_it(shapes, meta)
    with pytest.raises(fork.ForkLoadError, match=message):
        fork.check_loadable(shapes, meta, CFG)


def test_noop_spokes_are_exactly_zero_through_the_forks_formula(gen):
    """The fork's spoke residual (felix.spoke_residual is its formula) adds exactly 0.0 with the no-op tensors."""
    t = fork.noop_spoke_tensors(CFG.n_layer, CFG.d_model)
    h = torch.randn(3, 7, CFG.d_model, generator=gen) * 5
    out = spoke_residual(
        h,
        t["blk.0.spoke.norm.weight"],
        t["blk.0.spoke.w_down_fused.weight"],
        t["blk.0.spoke.w_up_fused.weight"],
        t["blk.0.spoke.gate_bias"],
        fork.NOOP_SPOKES[0],
        eps=CFG.norm_eps,
    )
    assert torch.equal(out, h)
    assert fork.spokes_are_noop(t)
    t["blk.1.spoke.w_up_fused.weight"][3, 0] = 1e-3
    assert not fork.spokes_are_noop(t)


@pytest.mark.parametrize("splice", ["merge", "adapter"])
def test_felix_exports_pass_the_loader_rules(tmp_path, splice):
    directory, model, _ = make_checkpoint(tmp_path / "ckpt", seed=SEED)
    out = tmp_path / "m.gguf"
    export_gguf(directory, out, arch="felix", quant="rq4", splice=splice)
    reader = open_gguf(out)
    meta = metadata(reader)
    assert (meta[fork.NUM_SPOKES_KEY], meta[fork.SPOKE_RANK_KEY]) == fork.NOOP_SPOKES
    fork.check_loadable({t.name: torch_shape(t) for t in reader.tensors}, meta, model.cfg)
    spoke_types = {t.tensor_type.name for t in reader.tensors if fork.is_spoke_tensor(t.name)}
    assert spoke_types == {"F32"}
