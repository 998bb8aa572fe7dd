"""Felix-LM model: presets, RoPE layout, splices, loss seam, overfitting, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from felix.model import felix_lm as M


def small_cfg(**kw):
    return M.FelixConfig(
        **{**dict(vocab_size=96, n_layer=4, d_model=64, n_head=2, n_kv_head=1, ffn_hidden=96, max_seq_len=32), **kw}
    )


@pytest.mark.parametrize(
    "name, low, high",
    [("tiny", 0.5e6, 2e6), ("pilot-50m", 45e6, 60e6), ("felix-300m", 300e6, 350e6), ("felix-500m", 450e6, 550e6)],
)
def test_preset_parameter_counts(name, low, high):
    cfg = M.preset(name)
    counts = M.parameter_counts(cfg)
    assert low <= counts["total"] <= high, M.format_parameter_counts(cfg)
    with torch.device("meta"):
        model = M.FelixLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert counts["splice"] == sum(p.numel() for n, p in model.named_parameters() if ".splice." in n)
    assert sorted({n.split(".")[1] for n, _ in model.named_parameters() if ".splice." in n}, key=int) == [
        str(i) for i in range(3, cfg.n_layer, 4)
    ]


def test_felix_300m_shape():
    cfg = M.preset("felix-300m")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size) == (24, 1024, 16, 32768)


def test_bad_config_and_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'felix-9b'.*tiny"):
        M.preset("felix-9b")
    with pytest.raises(ValueError, match="not a multiple of n_kv_head"):
        small_cfg(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown splice projection"):
        small_cfg(splice_projections=["ffn_sideways"])
    with pytest.raises(ValueError, match=r"splice layer\(s\) \[9\]"):
        small_cfg(splice_layers=[9])


def test_rope_rotates_adjacent_pairs(gen):
    """llama.cpp NORM rope: pair (2i, 2i+1) as a complex number times exp(i * pos * theta^(-2i/d))."""
    T, D = 7, 32
    x = torch.randn(1, 2, T, D, generator=gen, dtype=torch.float64)
    cos, sin = M.rope_cos_sin(T, D, 10000.0)
    got = M.apply_rope(x.float(), cos, sin).double()
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
        torch.ones(T, D // 2, dtype=torch.float64), pos * freq
    )
    want = torch.view_as_real(z).flatten(-2)
    assert (got - want).abs().max() < 1e-5
    # relative positions: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = x[0, 0, 0].float(), x[0, 1, 0].float()
    rq = M.apply_rope(q.expand(T, D)[None, None], cos, sin)[0, 0]
    rk = M.apply_rope(k.expand(T, D)[None, None], cos, sin)[0, 0]
    assert abs(float(rq[5] @ rk[3]) - float(rq[4] @ rk[2])) < 1e-4


def test_splice_linear_math_and_zero_start(gen):
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    w, a, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((12, 16), (4, 16), (12, 4)))
    gate = torch.tensor([0.7], dtype=torch.float64)
    want = x @ w.T + 0.7 * (x @ a.T) @ b.T
    assert torch.allclose(M._splice_linear(x, w, a, b, gate), want, atol=1e-12)
    cfg = small_cfg()
    spliced, plain = M.FelixLM(cfg), M.FelixLM(small_cfg(splice_projections=[]))
    plain.load_state_dict({k: v for k, v in spliced.state_dict().items() if ".splice." not in k})
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    assert torch.equal(spliced(tokens), plain(tokens))  # B = 0 at init: splices start as no-ops
    spliced.loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert spliced.blk[3].splice["ffn_down"].b.grad.abs().sum() > 0


def test_lm_loss_hinge_by_hand():
    weight = torch.eye(4, dtype=torch.float64)
    h = torch.tensor([[3.0, 2.5, 0.0, 0.0], [0.0, 5.0, 1.0, 0.0], [1.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 3])
    parts = M._lm_loss(h, weight, targets, torch.tensor([0, 1]), margin=1.0, lambda_q=2.0)
    ce = F.cross_entropy(h.float(), targets)
    # whitelisted targets 0 and 1: margins 0.5 and 4.0 -> hinges 0.5 and 0 -> mean 0.25; target 3 not protected
    assert math.isclose(float(parts.ce), float(ce), rel_tol=1e-6)
    assert math.isclose(float(parts.hinge), 0.25, rel_tol=1e-6) and int(parts.active_hinge_count) == 1
    assert math.isclose(float(parts.loss), float(ce) + 0.5, rel_tol=1e-6)
    ignored = M._lm_loss(h, weight, torch.tensor([0, -100, 3]), torch.tensor([0, 1]), 1.0, 2.0)
    assert math.isclose(float(ignored.hinge), 0.5, rel_tol=1e-6)


def test_tiny_model_overfits_one_batch(gen):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = M.FelixLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:]).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and float(loss.detach()) < 0.05, (first, float(loss.detach()))


def test_activation_checkpointing_matches(gen):
    cfg = small_cfg()
    a, b = M.FelixLM(cfg), M.FelixLM(small_cfg(checkpoint_activations=True))
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
    for m in (a, b):
        m.loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_checkpoint_round_trip(tmp_path, gen):
    cfg = small_cfg(tie_embeddings=False)
    model = M.FelixLM(cfg)
    with torch.no_grad():
        model.blk[3].splice["ffn_down"].b.normal_(generator=gen)
    M.save_checkpoint(tmp_path / "ck", model)
    M.save_checkpoint(tmp_path / "ck", model)  # overwriting an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    loaded = M.load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == cfg and "output.weight" in loaded.state_dict()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    assert torch.equal(loaded(tokens), model(tokens))


def test_checkpoint_mismatch_lists_tensors(tmp_path):
    from safetensors.torch import save_file

    model = M.FelixLM(small_cfg())
    M.save_checkpoint(tmp_path / "ck", model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["blk.0.attn_q.weight"]
    state["blk.0.bogus.weight"] = torch.zeros(2)
    state["blk.1.ffn_up.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(M.CheckpointError) as err:
        M.load_checkpoint(tmp_path / "ck")
    msg = str(err.value)
    assert "missing tensors (1): blk.0.attn_q.weight" in msg
    assert "unexpected tensors (1): blk.0.bogus.weight" in msg
    assert "blk.1.ffn_up.weight: (3, 3)" in msg and "(96, 64)" in msg


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    M.save_checkpoint(tmp_path / "ck", M.FelixLM(small_cfg()))
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(M.CheckpointError, match="corrupt or truncated"):
        M.load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text('{"n_layer": ')
    with pytest.raises(M.CheckpointError, match="config.json is corrupt"):
        M.load_checkpoint(tmp_path / "ck")
    with pytest.raises(M.CheckpointError, match="config.json is missing"):
        M.load_checkpoint(tmp_path / "nothing")


def test_model_splices_are_reachable_by_gguf_name():
    """The model's splices are felix.model.splice.SpliceCores: the name API reads and writes them by GGUF name."""
    from felix.model import splice

    model = M.FelixLM(M.preset("tiny"))
    names = splice.list_splices(model)
    assert names and all(n.startswith("blk.") and ".splice." in n for n in names)
    name = next(n for n in names if n.endswith(".b"))
    value = torch.randn(names[name][0])
    splice.write_splice(model, name, value)
    assert torch.equal(dict(model.named_parameters())[name], value)
