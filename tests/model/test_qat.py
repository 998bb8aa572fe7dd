"""Quantization-aware training (felix.model.qat): the fake-quant forward is the exporter's codec roundtrip bit for bit, the
BitNet codec writes TQ2_0 blocks that gguf-py decodes to BitNet's definition, the backward is the straight-through
estimator, checkpoints keep the latent weights under their plain names, `felix train --qat` trains and records the
mode, and `felix export` writes the bytes the forward decoded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SEED

import felix
from felix.model import qat
from felix.model.felix_lm import FelixConfig, FelixLM, load_checkpoint, save_checkpoint
from felix.ops.quant_policy import choose_tensor_type

FORMAT_MODES = tuple(felix.FORMATS)


def small_model(seed: int = SEED, splice: bool = False) -> FelixLM:
    torch.manual_seed(seed)
    cfg = FelixConfig(
        vocab_size=300,
        n_layer=1,
        d_model=256,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=512,
        max_seq_len=64,
        splice_layers=[0] if splice else [],
        init_std=0.05,
    )
    return FelixLM(cfg)


def bitnet_truth(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 on blocks of 256, in float64 numpy: s = fp16(mean|w|), w -> clip(round(w / s), -1, 1) * s."""
    x = w.detach().double().numpy().reshape(-1, 256)
    s = np.float16(np.abs(x).mean(axis=1)).astype(np.float64)[:, None]
    r = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    q = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -1, 1)  # round half away from zero
    return torch.from_numpy((q * s).reshape(w.shape))


def test_bitnet_codec_is_bitnet_and_gguf_reads_it():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(24, 512, generator=g) * torch.exp(torch.randn(24, 1, generator=g))
    w[3, :256] = 0.0  # an all-zero block: scale 0, every weight 0
    w[5, 7] = 40.0  # an outlier pulls the absmean but not the other weights to zero
    blocks = qat.quantize_ternary_absmean(w)
    assert blocks.shape == (24, 2 * 66) and blocks.dtype == torch.uint8
    ours = felix.dequantize(blocks, "tq2_0", w.shape)
    truth = bitnet_truth(w)
    assert torch.equal(ours.double(), truth)
    theirs = gguf_dequantize(blocks.numpy(), GGMLQuantizationType.TQ2_0).reshape(w.shape)
    assert np.array_equal(theirs.astype(np.float64), truth.numpy())
    assert set(torch.unique(ours[0, :256] / ours[0, :256].abs().max()).tolist()) == {-1.0, 0.0, 1.0}
    # not ggml's absmax rounding: with absmax most weights of a Gaussian block would be 0
    assert (
        (ours != 0).double().mean()
        > 0.5
        > (felix.dequantize(felix.quantize(w, "tq2_0"), "tq2_0", w.shape) != 0).double().mean()
    )


def test_bitnet_codec_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of TQ2_0's block"):
        qat.quantize_ternary_absmean(torch.randn(4, 100))
    w = torch.randn(2, 256)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        qat.quantize_ternary_absmean(w)


@pytest.mark.parametrize("mode", FORMAT_MODES + ("bitnet",))
def test_forward_weights_are_the_export_codec_roundtrip(mode):
    model = small_model()
    latent = {k: v.clone() for k, v in model.state_dict().items()}
    qat.apply_qat(model, mode)
    cfg = model._felix_qat
    assert cfg.tensor_types, mode
    seen = set()
    for name, w in qat.quantized_weights(model).items():
        c = choose_tensor_type(name, w.shape, qat.export_type(mode))
        assert cfg.tensor_types[name] == c.type  # the export policy's choice, tensor by tensor
        if qat.codec_of(c.type, mode) == "bitnet":
            want = felix.dequantize(qat.quantize_ternary_absmean(latent[name]), "tq2_0", w.shape)
        else:
            want = felix.dequantize(felix.quantize(latent[name], c.type), c.type, w.shape)
        assert torch.equal(w, want), name
        assert not torch.equal(w, latent[name]), name
        seen.add(c.type)
    assert qat.export_type(mode) in seen
    for name in ("blk.0.attn_norm.weight", "output_norm.weight"):  # F32 in the export: untouched
        assert name not in cfg.tensor_types


@pytest.mark.parametrize("mode", ["rq4", "tq2_0"])
def test_backward_is_the_straight_through_estimator(mode):
    """The latent weight's gradient equals the gradient a plain model holding the quantized weights gets."""
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randint(0, 300, (2, 33), generator=g)
    model = qat.apply_qat(small_model(), mode)
    plain = small_model()
    with torch.no_grad():
        qw = qat.quantized_weights(model)
        for name, p in plain.named_parameters():
            p.copy_(qw.get(name, model.state_dict()[name]))
    model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    plain.loss(x[:, :-1], x[:, 1:]).loss.backward()
    grads = {n.replace("parametrizations.", "").replace(".original", ""): p.grad for n, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        assert grads[name] is not None and torch.equal(grads[name], p.grad), name


def test_bitnet_rounds_activations_with_ste():
    from felix.ops.activation_rounding import round_q8_k

    model = qat.apply_qat(small_model(), "bitnet")
    block = model.blk[0]
    x = torch.randn(3, 256, requires_grad=True)
    y = block.activation_rounding("blk.0.attn_q.weight", x)
    assert torch.equal(y, round_q8_k(x.detach()))  # TQ2_0 weights: llama.cpp's Q8_K activations
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert qat.apply_qat(small_model(), "rq4").blk[0].activation_rounding is None


def test_state_dict_holds_latent_weights_under_plain_names(tmp_path):
    model = small_model()
    latent = {k: v.clone() for k, v in model.state_dict().items()}
    qat.apply_qat(model, "bitnet")
    sd = model.state_dict()
    assert set(sd) == set(latent) and all(torch.equal(sd[k], latent[k]) for k in sd)
    save_checkpoint(tmp_path / "ck", model)
    plain = load_checkpoint(tmp_path / "ck")
    assert all(torch.equal(plain.state_dict()[k], latent[k]) for k in latent)
    other = qat.apply_qat(small_model(seed=SEED + 5), "bitnet")
    other.load_state_dict(latent)  # a plain state dict loads into a patched model
    assert all(torch.equal(other.state_dict()[k], latent[k]) for k in latent)
    qat.remove_qat(model)
    assert set(dict(model.named_parameters())) == set(latent) and model.blk[0].activation_rounding is None
    with pytest.raises(ValueError, match="unknown QAT mode"):
        qat.apply_qat(model, "q3_k")
    qat.apply_qat(model, "q4_0")
    with pytest.raises(ValueError, match="already patched"):
        qat.apply_qat(model, "q4_0")


def test_qat_config_record_roundtrips_and_refuses_junk(tmp_path):
    model = qat.apply_qat(small_model(), "bitnet")
    qat.write_qat_config(tmp_path / qat.QAT_FILE, model)
    assert qat.read_qat_config(tmp_path) == model._felix_qat
    assert qat.read_qat_config(tmp_path / "nowhere") is None
    (tmp_path / qat.QAT_FILE).write_text('{"mode": "bitnet"}')
    with pytest.raises(ValueError, match="not a Felix QAT record"):
        qat.read_qat_config(tmp_path)


def test_felix_train_qat_trains_and_records(tmp_path):
    from test_train import tiny_run, write_docs

    from felix.train.loop import train

    docs = write_docs(tmp_path / "d.jsonl", 60, SEED)
    cfg = tiny_run(tmp_path, "qat", preset="tiny-256", data=[docs], steps=6, eval_every=3, warmup_steps=1, qat="bitnet")
    res = train(cfg)
    ck = res.out_dir / "checkpoint"
    rec = qat.read_qat_config(ck)
    assert rec.mode == "bitnet" and rec.tensor_types["blk.0.ffn_down.weight"] == "tq2_0"
    assert all(np.isfinite(res.step_losses)) and res.step_losses[-1] < res.step_losses[0]
    model = qat.load_qat_checkpoint(ck)
    w = model.blk[0].attn_q.weight.detach()
    latent = load_checkpoint(ck).blk[0].attn_q.weight.detach()
    assert (w.reshape(-1, 256) / w.reshape(-1, 256).abs().amax(1, keepdim=True)).unique().tolist() == [-1.0, 0.0, 1.0]
    assert latent.unique().numel() > 1000  # the checkpoint keeps the latent full-precision weights
    with pytest.raises(ValueError, match="unknown qat mode"):
        tiny_run(tmp_path, "bad", qat="int3")
    with pytest.raises(ValueError, match="--qat does not run under --parallel fsdp"):  # refused, not a crash in FSDP2
        tiny_run(tmp_path, "bad", qat="rq4", parallel="fsdp")


@pytest.mark.parametrize("mode", ["bitnet", "q4_0"])
def test_export_writes_the_bytes_the_forward_used(tmp_path, mode):
    from felix.ship.export import export_gguf, model_from_gguf
    from felix.ship.gguf_file import open_gguf
    from felix.model.tokenizer import train_tokenizer

    tok = train_tokenizer(["some text to learn a few merges from, some text again"] * 20, 300)
    model = small_model()
    qat.apply_qat(model, mode)
    ck = save_checkpoint(tmp_path / "ck", model, tok, {qat.QAT_FILE: lambda p: qat.write_qat_config(p, model)})
    out = tmp_path / "m.gguf"
    res = export_gguf(ck, out, quant=qat.export_type(mode))
    assert {t.name for t in res.tensors if t.note.startswith("QAT")} == set(model._felix_qat.tensor_types)
    reader = {t.name: t for t in open_gguf(out).tensors}
    latent = model.state_dict()
    for name, type_name in model._felix_qat.tensor_types.items():
        want = qat.encode(latent[name], type_name, mode).numpy().reshape(-1)
        assert np.array_equal(np.asarray(reader[name].data).reshape(-1).view(np.uint8), want), name
    decoded = model_from_gguf(out).state_dict()
    for name, w in qat.quantized_weights(model).items():
        assert torch.equal(decoded[name], w), name
    # the same weights from the checkpoint alone (qat.json) and from the patched model passed in
    res2 = export_gguf(ck, tmp_path / "m2.gguf", quant=qat.export_type(mode), model=model)
    assert (tmp_path / "m2.gguf").read_bytes() == out.read_bytes() and len(res2.tensors) == len(res.tensors)


def test_export_refuses_merging_a_live_splice_into_a_qat_weight(tmp_path):
    from felix.ship.export import ExportError, export_gguf
    from felix.model.tokenizer import train_tokenizer

    tok = train_tokenizer(["some text to learn a few merges from"] * 20, 300)
    model = small_model(splice=True)
    with torch.no_grad():
        model.blk[0].splice["ffn_down"].b.normal_(0, 0.05)
    qat.apply_qat(model, "q4_0")
    ck = save_checkpoint(tmp_path / "ck", model, tok, {qat.QAT_FILE: lambda p: qat.write_qat_config(p, model)})
    with pytest.raises(ExportError, match="--splice adapter"):
        export_gguf(ck, tmp_path / "m.gguf", quant="q4_0")
    export_gguf(ck, tmp_path / "latent.gguf", quant="f32")  # a float file holds the latent model: merging is exact
    res = export_gguf(ck, tmp_path / "m.gguf", quant="q4_0", splice="adapter")
    assert res.adapter_path.is_file()
    with pytest.warns(RuntimeWarning, match="post-training quantization"):
        export_gguf(ck, tmp_path / "p.gguf", quant="q8_0", splice="adapter")


def test_qat_does_not_change_a_deepcopy_or_plain_forward():
    """apply_qat patches only the model it is given; remove_qat restores the exact full-precision forward."""
    model = small_model()
    x = torch.randint(0, 300, (1, 16))
    before = model(x)
    twin = copy.deepcopy(model)
    qat.apply_qat(model, "rq4")
    assert not torch.equal(model(x), before) and torch.equal(twin(x), before)
    qat.remove_qat(model)
    assert torch.equal(model(x), before)


def test_fidelity_simulates_the_qat_checkpoints_shipped_weights():
    """felix fidelity on a QAT checkpoint quantizes with the codec its forward used (bitnet), not ggml's absmax."""
    from felix.verify.fidelity import quantized_state

    model = qat.apply_qat(small_model(), "bitnet")
    state = model.state_dict()
    qstate, _ = quantized_state(state, "tq2_0", qat=model._felix_qat)
    ptq, _ = quantized_state(state, "tq2_0")
    for name, w in qat.quantized_weights(model).items():
        assert torch.equal(qstate[name], w), name
    assert not torch.equal(ptq["blk.0.ffn_up.weight"], qstate["blk.0.ffn_up.weight"])
