"""The GGUF exporter without llama.cpp: the per-tensor policy, read-back with gguf-py and Felix's reader (every
tensor byte for byte, RQ4 as ggml type 42), the splice merge arithmetic, and bad input (no partial files)."""

from __future__ import annotations

import errno

import gguf
import numpy as np
import pytest
import torch
from conftest import SEED
from export_fixtures import make_checkpoint

import felix
from felix.core import fork
from felix.cli.main import main as felix_main
from felix.ship.export import ExportError, base_tensors, export_gguf, model_from_gguf
from felix.ship.gguf_file import FelixGGUFWriter, GGUFError, open_gguf, tensor_to_torch, torch_shape
from felix.model.felix_lm import CheckpointError, FelixConfig, FelixLM, save_checkpoint
from felix.ops.quant_policy import choose_tensor_type, roundtrip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory, model, tok = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", seed=SEED)
    return directory, model, tok


# --------------------------------------------------------------------------------------- the policy
@pytest.mark.parametrize(
    "name, shape, quant, want, fallback",
    [
        ("blk.0.attn_norm.weight", (256,), "rq4", "f32", False),  # 1-D: F32
        ("blk.3.splice.ffn_down.a", (8, 1024), "rq4", "f32", False),  # runtime-edit surface: F32
        ("blk.3.splice.ffn_down.gate", (1,), "q4_0", "f32", False),
        ("blk.1.spoke.w_down_fused.weight", (32, 1024), "rq4", "f32", False),  # fork spokes: edit surface too
        ("blk.0.attn_k.weight", (16, 32), "q4_0", "f32", False),  # 512 elements: small
        ("token_embd.weight", (1024, 256), "rq4", "q8_0", False),  # embedding: Q8_0 for 4-bit
        ("token_embd.weight", (1024, 256), "f16", "f16", False),
        ("token_embd.weight", (1024, 256), "q8_0", "q8_0", False),
        ("blk.0.attn_q.weight", (256, 256), "tq2_0", "tq2_0", False),
        ("blk.0.attn_q.weight", (128, 128), "tq2_0", "q8_0", True),  # 128 % 256: falls back to Q8_0
        ("blk.0.ffn_down.weight", (128, 344), "iq4_nl", "f16", True),  # 344 % 32: falls back to F16
        ("blk.0.ffn_down.weight", (128, 352), "rq4", "rq4", False),
        ("blk.0.ffn_down.weight", (128, 352), "bf16", "bf16", False),
    ],
)
def test_policy_table(name, shape, quant, want, fallback):
    c = choose_tensor_type(name, shape, quant)
    assert (c.type, c.fallback) == (want, fallback), c
    if fallback:
        assert str(shape[-1]) in c.reason


def test_policy_embedding_override_and_unknown_types():
    assert choose_tensor_type("token_embd.weight", (1024, 256), "rq4", embedding_type="rq4").type == "rq4"
    with pytest.raises(ValueError, match="q3_k"):
        choose_tensor_type("blk.0.attn_q.weight", (256, 256), "q3_k")


# --------------------------------------------------------------------------------------- read-back
def felix_arch_state(model) -> dict[str, torch.Tensor]:
    """What a felix-arch export holds: the merged weights and the fork's no-op spokes in every layer."""
    spokes = fork.noop_spoke_tensors(model.cfg.n_layer, model.cfg.d_model)
    assert fork.spokes_are_noop(spokes) and spokes
    return {**base_tensors(model, "merge"), **spokes}


def _stored_bytes(t: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "f32":
        return t.float().numpy().view(np.uint8).reshape(-1)
    if type_name == "f16":
        return t.half().numpy().view(np.uint8).reshape(-1)
    if type_name == "bf16":
        return t.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(-1)
    return felix.quantize(t.float().contiguous(), type_name).numpy().reshape(-1)


@pytest.mark.parametrize("quant", ["q4_0", "bf16"])
def test_stock_reader_reads_every_tensor_byte_for_byte(ckpt, tmp_path, quant):
    """gguf-py's own GGUFReader (no Felix code) reads a felix-arch export; every tensor's bytes are what
    Felix's codecs / torch casts produce from the checkpoint under the policy's type."""
    directory, model, _ = ckpt
    out = tmp_path / "m.gguf"
    result = export_gguf(directory, out, arch="felix", quant=quant, splice="merge")
    reader = gguf.GGUFReader(out)
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "felix"
    state = felix_arch_state(model)
    assert {t.name for t in reader.tensors} == set(state)
    types = {t.name: t.type for t in result.tensors}
    for t in reader.tensors:
        assert tuple(reversed(t.shape.tolist())) == tuple(state[t.name].shape), t.name
        np.testing.assert_array_equal(
            np.asarray(t.data).view(np.uint8).reshape(-1), _stored_bytes(state[t.name], types[t.name]), err_msg=t.name
        )


def test_rq4_felix_export_round_trips(ckpt, tmp_path):
    """RQ4 is ggml type 42: gguf-py's plain reader refuses it (it does not know 42), Felix's reader (a
    GGUFReader subclass) reads it; every tensor round-trips byte for byte and decodes to the codec's output."""
    directory, model, _ = ckpt
    out = tmp_path / "rq4.gguf"
    result = export_gguf(directory, out, arch="felix", quant="rq4", splice="merge")
    assert {t.type for t in result.tensors} == {"rq4", "q8_0", "f32"}
    with pytest.raises(ValueError, match="42"):
        gguf.GGUFReader(out)
    reader = open_gguf(out)
    state = felix_arch_state(model)
    types = {t.name: t.type for t in result.tensors}
    n_rq4 = 0
    for t in reader.tensors:
        assert torch_shape(t) == tuple(state[t.name].shape)
        np.testing.assert_array_equal(
            np.asarray(t.data).view(np.uint8).reshape(-1), _stored_bytes(state[t.name], types[t.name]), err_msg=t.name
        )
        if types[t.name] == "rq4":
            n_rq4 += 1
            assert int(t.tensor_type) == 42 and t.tensor_type.name == "RQ4"
            assert int(t.field.parts[4][0]) == 42  # the raw tensor-info type id in the file
            torch.testing.assert_close(tensor_to_torch(t), roundtrip(state[t.name], "rq4"), rtol=0, atol=0)
    assert n_rq4 == 7 * model.cfg.n_layer
    back = model_from_gguf(out)
    assert back.cfg.splice_layers == []  # merged: the file has no splices
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, roundtrip(state[k], types[k]), rtol=0, atol=0)


def test_merge_is_w_plus_gated_b_a(ckpt):
    _, model, _ = ckpt
    merged = base_tensors(model, "merge")
    assert not any(".splice." in k for k in merged)
    n = 0
    for layer, block in enumerate(model.blk):
        for proj in block.splice:
            core = block.splice[proj]
            w = getattr(block, proj).weight.double()
            want = w + core.gate.double() * (core.b.double() @ core.a.double())
            torch.testing.assert_close(merged[f"blk.{layer}.{proj}.weight"].double(), want, rtol=0, atol=1e-6)
            n += 1
    assert n == 2
    untouched = base_tensors(model, "adapter")
    torch.testing.assert_close(untouched["blk.0.attn_q.weight"], model.blk[0].attn_q.weight.float())


def test_summary_table_reports_types_sizes_and_fallbacks(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "c", seed=1, d_model=128, n_layer=1)
    result = export_gguf(directory, tmp_path / "t.gguf", quant="tq2_0")
    table = result.table()
    assert "not divisible by tq2_0's block of 256" in table  # every 128-wide row falls back, and says so
    assert f"{result.file_bytes / 2**20:.2f} MiB" in table and "bits/weight" in table
    assert sum(t.nbytes for t in result.tensors) <= result.file_bytes
    types = {t.name: (t.type, t.note) for t in result.tensors}
    assert types["blk.0.ffn_down.weight"] == ("tq2_0", "")  # rows of ffn_hidden = 256 fit TQ2_0's blocks
    assert types["blk.0.attn_q.weight"][0] == "q8_0" and "128" in types["blk.0.attn_q.weight"][1]
    n = sum(t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1) for t in result.tensors)
    assert result.bits_per_weight == pytest.approx(8 * sum(t.nbytes for t in result.tensors) / n)


def test_cli_export_and_inspect(ckpt, tmp_path, capsys):
    directory, _, _ = ckpt
    out = tmp_path / "cli.gguf"
    assert felix_main(["export", str(directory), str(out), "--quant", "q4_0"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert felix_main(["export", str(directory), str(out), "--quant", "q4_0"]) == 2
    assert "exists" in capsys.readouterr().err
    assert felix_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokenizer.ggml.model = gpt2" in text and "blk.0.attn_q.weight" in text and "Q4_0" in text


# --------------------------------------------------------------------------------------- bad input
def test_refuses_bad_combinations(ckpt, tmp_path):
    directory, _, _ = ckpt
    with pytest.raises(ExportError, match="--arch felix"):
        export_gguf(directory, tmp_path / "a.gguf", arch="llama", quant="rq4")
    for arch in ("llama", "felix"):  # the fork has no SpliceCore tensors: native is refused, with the way out
        with pytest.raises(ExportError, match="--splice adapter"):
            export_gguf(directory, tmp_path / "b.gguf", arch=arch, splice="native")
    with pytest.raises(ValueError, match="q2_k"):
        export_gguf(directory, tmp_path / "c.gguf", quant="q2_k")
    assert not list(tmp_path.iterdir())


def test_refuses_existing_output_unless_forced(ckpt, tmp_path):
    directory, _, _ = ckpt
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError, match="exists"):
        export_gguf(directory, out, quant="q8_0")
    assert out.read_bytes() == b"precious"
    export_gguf(directory, out, quant="q8_0", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_partial_file(ckpt, tmp_path, monkeypatch, failure):
    """A full disk (or any exception) while tensors are written: no file under the output name, no temp file
    left, and a file being replaced (--force) stays as it was."""
    directory, _, _ = ckpt
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old export")
    real = FelixGGUFWriter.write_tensors_to_file

    def write_then_fail(self, *args, **kwargs):
        for fout in self.fout:  # some bytes reach the temp file first, as on a real full disk
            fout.write(b"\0" * 4096)
        raise failure

    monkeypatch.setattr(FelixGGUFWriter, "write_tensors_to_file", write_then_fail)
    with pytest.raises(type(failure)):
        export_gguf(directory, out, quant="q4_0", splice="adapter", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert out.read_bytes() == b"old export"
    monkeypatch.setattr(FelixGGUFWriter, "write_tensors_to_file", real)


def test_checkpoint_that_does_not_match_its_config(ckpt, tmp_path):
    directory, model, tok = ckpt
    wrong = FelixLM(FelixConfig(**{**model.cfg.__dict__, "ffn_hidden": 384}))
    save_checkpoint(tmp_path / "wrong", wrong, tok)
    (tmp_path / "wrong" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="ffn_gate.weight"):
        export_gguf(tmp_path / "wrong", tmp_path / "w.gguf")
    assert not (tmp_path / "w.gguf").exists()


def test_missing_tokenizer_no_splices_and_nan(ckpt, tmp_path):
    directory, model, tok = ckpt
    save_checkpoint(tmp_path / "notok", model)
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(tmp_path / "notok", tmp_path / "x.gguf")
    plain = FelixLM(FelixConfig(**{**model.cfg.__dict__, "splice_layers": []}))
    save_checkpoint(tmp_path / "plain", plain, tok)
    with pytest.raises(ExportError, match="no SpliceCore"):
        export_gguf(tmp_path / "plain", tmp_path / "y.gguf", splice="adapter")
    with torch.no_grad():
        plain.blk[0].ffn_up.weight[3, 5] = float("nan")
    save_checkpoint(tmp_path / "nan", plain, tok)
    with pytest.raises(ExportError, match="blk.0.ffn_up.weight"):
        export_gguf(tmp_path / "nan", tmp_path / "z.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_truncated_and_foreign_files_are_named(ckpt, tmp_path):
    directory, _, _ = ckpt
    out = tmp_path / "m.gguf"
    export_gguf(directory, out, quant="q8_0")
    data = out.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF"):
        open_gguf(tmp_path / "text.gguf")
