"""Spokes in Felix-LM (felix.model.spokes) outside the runtime: freezing the hub, spoke files tied to their hub, the export
of real spokes in the fork's fused form (types, metadata, loader rules) and the import back, and the refusals: spokes
the fork cannot load, spokes on the stock llama arch, a spoke file whose hub does not match."""

import pytest
import torch

from export_fixtures import make_checkpoint
from felix.core import fork
from felix.model import spokes
from felix.ship.export import ExportError, export_gguf, model_from_gguf
from felix.ship.gguf_file import metadata, open_gguf
from felix.model.felix_lm import FelixLM, preset, save_checkpoint


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    directory, model, tok = make_checkpoint(tmp_path_factory.mktemp("spoke-hub") / "checkpoint", seed=5)
    return directory, model, tok


def trained_like(model, seed, scale=0.3):
    """Spokes as training leaves them: W_up away from zero, norms and gates moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blk:
            if b.spoke is not None:
                b.spoke.w_up_fused.weight.normal_(0, scale, generator=g)
                b.spoke.norm.weight.add_(0.1 * torch.randn(b.spoke.norm.weight.shape, generator=g))
                b.spoke.gate_bias.add_(0.5 * torch.randn(1, generator=g))
    return model


def with_spokes(hub, seed, n=4, rank=8, layers=None):
    directory, model, tok = hub
    m = FelixLM(model.cfg.__class__(**{**model.cfg.__dict__}))
    m.load_state_dict(model.state_dict())
    spokes.add_spokes(m, n, rank, layers)
    return trained_like(m, seed), tok


def test_freeze_hub_leaves_only_spokes_trainable(hub, seed):
    m, _ = with_spokes(hub, seed)
    names = spokes.freeze_hub(m)
    assert names and all(".spoke." in n for n in names)
    assert all(p.requires_grad == (".spoke." in n) for n, p in m.named_parameters())
    with pytest.raises(spokes.SpokeError, match="no spokes"):
        spokes.freeze_hub(FelixLM(preset("tiny")))


def test_spoke_file_round_trip_and_hub_mismatch(hub, tmp_path, seed):
    m, _ = with_spokes(hub, seed)
    path = spokes.save_spokes(tmp_path / "task.safetensors", m)
    fresh = FelixLM(hub[1].cfg.__class__(**{**hub[1].cfg.__dict__}))
    fresh.load_state_dict(hub[1].state_dict())
    spokes.load_spokes(fresh, path)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in fresh.state_dict().items())
    x = torch.randint(0, m.cfg.vocab_size, (1, 20))
    assert torch.equal(fresh(x), m(x))
    # a different hub (one weight changed): refused, nothing attached
    other = FelixLM(hub[1].cfg.__class__(**{**hub[1].cfg.__dict__}))
    other.load_state_dict(hub[1].state_dict())
    with torch.no_grad():
        other.blk[0].attn_q.weight[0, 0] += 1e-3
    with pytest.raises(spokes.SpokeError, match="different hub"):
        spokes.load_spokes(other, path)
    assert other.cfg.n_spokes == 0
    with pytest.raises(spokes.SpokeError, match="does not match"):
        spokes.load_spokes(FelixLM(preset("tiny")), path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(spokes.SpokeError, match="not a readable spoke file"):
        spokes.load_spokes(fresh, tmp_path / "junk.safetensors")


def test_export_writes_the_trained_spokes_fused_and_imports_them_back(hub, tmp_path, seed):
    m, tok = with_spokes(hub, seed, layers=[1])  # layer 0 has none: written as a no-op of the same shape
    directory = save_checkpoint(tmp_path / "ckpt", m, tok)
    out = tmp_path / "spokes.gguf"
    res = export_gguf(directory, out, arch="felix", quant="rq4")
    reader = open_gguf(out)
    meta = metadata(reader)
    assert (meta[fork.NUM_SPOKES_KEY], meta[fork.SPOKE_RANK_KEY]) == (4, 8)
    types = {t.name: t.tensor_type.name for t in reader.tensors if fork.is_spoke_tensor(t.name)}
    assert set(types.values()) == {"F32"} and "blk.0.spoke.w_up_fused.weight" in types
    assert {t.name for t in res.tensors} >= set(fork.spoke_shapes(2, m.cfg.d_model, 4, 8))
    back = model_from_gguf(out)
    assert (back.cfg.n_spokes, back.cfg.spoke_rank) == (4, 8)
    want = m.state_dict()
    for k, v in back.state_dict().items():
        if ".spoke." in k and k.startswith("blk.1."):
            assert torch.equal(v, want[k]), k  # F32: exact
    assert not back.blk[0].spoke.w_up_fused.weight.any()
    # the spoke file of a run exports onto its hub; a foreign one is refused
    spoke_file = spokes.save_spokes(tmp_path / "s.safetensors", m)
    out2 = tmp_path / "hub+spokes.gguf"
    export_gguf(hub[0], out2, arch="felix", quant="f32", spokes=spoke_file)
    assert metadata(open_gguf(out2))[fork.NUM_SPOKES_KEY] == 4
    other = make_checkpoint(tmp_path / "other", seed=seed + 7)[0]
    with pytest.raises(ExportError, match="different hub"):
        export_gguf(other, tmp_path / "x.gguf", arch="felix", quant="f32", spokes=spoke_file)
    assert not (tmp_path / "x.gguf").exists()


def test_spokes_the_stock_arch_cannot_hold_are_refused(hub, tmp_path, seed):
    m, tok = with_spokes(hub, seed)
    directory = save_checkpoint(tmp_path / "ckpt", m, tok)
    with pytest.raises(ExportError, match="--arch felix"):
        export_gguf(directory, tmp_path / "llama.gguf", arch="llama", quant="f32")
    assert not (tmp_path / "llama.gguf").exists()
    fresh, _ = with_spokes(hub, seed)
    with torch.no_grad():
        for b in fresh.blk:
            b.spoke.w_up_fused.weight.zero_()
    export_gguf(save_checkpoint(tmp_path / "fresh", fresh, tok), tmp_path / "ok.gguf", arch="llama", quant="f32")


def test_spoke_counts_the_fork_cannot_load_are_refused(hub):
    cfg = hub[1].cfg
    shapes = {**fork.hub_shapes(cfg), **fork.spoke_shapes(cfg.n_layer, cfg.d_model, 5, 8, fused=False)}
    with pytest.raises(fork.ForkLoadError, match="at most 4 per layer"):
        fork.check_loadable(shapes, {fork.NUM_SPOKES_KEY: 5, fork.SPOKE_RANK_KEY: 8}, cfg)
    fused = {**fork.hub_shapes(cfg), **fork.spoke_shapes(cfg.n_layer, cfg.d_model, 5, 8)}
    fork.check_loadable(fused, {fork.NUM_SPOKES_KEY: 5, fork.SPOKE_RANK_KEY: 8}, cfg)  # fused: any count
    with pytest.raises(fork.ForkLoadError, match="must be >= 1"):
        fork.check_loadable(fork.hub_shapes(cfg), {fork.NUM_SPOKES_KEY: 0, fork.SPOKE_RANK_KEY: 8}, cfg)
    with pytest.raises(fork.ForkLoadError, match="uint32"):
        fork.check_loadable(fused, {fork.NUM_SPOKES_KEY: 2**32, fork.SPOKE_RANK_KEY: 1}, cfg)
