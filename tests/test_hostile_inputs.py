"""Every file a user can hand Felix, broken or hostile: an error that names the file and the problem (`felix`
exits 2), never a traceback, a hang, a terabyte allocation, a dead interpreter, an overwritten input or code run
from the file. One tiny checkpoint (tokenizer, splices) and its F32 GGUF serve every case."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from export_fixtures import make_checkpoint
from safetensors.torch import save_file

from felix.cli.main import main
from felix.testing.payload import PicklePayload, pickle_payload
from felix.model.felix_lm import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    FelixConfig,
    FelixLM,
    load_checkpoint,
    load_config,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    directory, model, tok = make_checkpoint(root / "ck", seed=3, d_model=64, n_layer=2, vocab_size=300)
    return directory


@pytest.fixture(scope="module")
def gguf_path(ckpt, tmp_path_factory):
    from felix.ship.export import export_gguf

    return export_gguf(ckpt, tmp_path_factory.mktemp("gguf") / "m.gguf", quant="f32").path


def _copy(ckpt, tmp_path, name="ck"):
    return shutil.copytree(ckpt, tmp_path / name)


def _cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------ config.json: validated before allocating
def _tiny_checkpoint(directory):
    cfg = FelixConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=16)
    return save_checkpoint(directory, FelixLM(cfg))


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("n_layer", 1_000_000, "n_layer 1000000 exceeds"),
        ("vocab_size", 2**40, "vocab_size 1099511627776 exceeds"),
        ("d_model", 2**33, "d_model 8589934592 exceeds"),
        ("n_head", 0, "n_head 0 and n_kv_head 1 must be positive"),
        ("n_kv_head", 0, "must be positive"),
        ("n_head", 3, "d_model 32 is not a multiple of n_head 3"),
        ("n_layer", "4", "n_layer must be an integer, got '4'"),
        ("d_model", 32.0, "d_model must be an integer"),
        ("tie_embeddings", "yes", "tie_embeddings must be true or false"),
        ("norm_eps", -1.0, "norm_eps must be a positive finite number"),
        ("splice_layers", "all", "splice_layers must be null or a list"),
    ],
)
def test_config_json_hyperparameters_are_checked(tmp_path, field, value, fragment):
    directory = _tiny_checkpoint(tmp_path / "ck")
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**cfg, field: value}))
    for load in (load_config, load_checkpoint):
        with pytest.raises(CheckpointError, match=fragment) as e:
            load(directory)
        assert str(directory / CONFIG_FILE) in str(e.value)


def test_config_that_its_weights_do_not_hold_is_refused_before_building(tmp_path):
    """Within the limits but a terabyte: the stored tensors' shapes (the safetensors header) say what the model
    is, so the config is refused before a model of its size is allocated."""
    directory = _tiny_checkpoint(tmp_path / "ck")
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(
        json.dumps({**cfg, "vocab_size": 4_000_000, "d_model": 65536, "n_head": 512, "n_kv_head": 256, "n_layer": 1024})
    )
    with pytest.raises(CheckpointError, match="does not fit the model") as e:
        load_checkpoint(directory)
    assert str(directory / WEIGHTS_FILE) in str(e.value) and "n_layer 1024, the file holds blk.0..blk.1" in str(e.value)
    (directory / CONFIG_FILE).write_text(
        json.dumps({**cfg, "vocab_size": 4_000_000, "d_model": 65536, "n_head": 512, "n_kv_head": 256})
    )
    with pytest.raises(CheckpointError, match=r"token_embd.weight is \(64, 32\), its config says vocab_size 4000000"):
        load_checkpoint(directory)
    (directory / CONFIG_FILE).write_text(json.dumps({**cfg, "ffn_hidden": 262144}))
    with pytest.raises(CheckpointError, match=r"blk.0.ffn_gate.weight: \(64, 32\) in .*, model wants \(262144, 32\)"):
        load_checkpoint(directory)


def test_config_json_that_is_not_json_or_not_utf8(tmp_path, capsys):
    directory = _tiny_checkpoint(tmp_path / "ck")
    for data, fragment in [
        (b"\xff\xfe\x00binary", "as UTF-8 text"),
        (b'{"n_layer": ', "is corrupt or not a Felix"),
        (b"[1, 2, 3]", "holds a JSON list"),
    ]:
        (directory / CONFIG_FILE).write_bytes(data)
        with pytest.raises(CheckpointError, match=fragment):
            load_config(directory)
        code, err = _cli(["export", directory, tmp_path / "out.gguf"], capsys)
        assert code == 2 and str(directory / CONFIG_FILE) in err and "Traceback" not in err


# ------------------------------------------------------------------ GGUF headers: validated against the tensors
def _forge(src, dst, **values):
    """Copy `src` to `dst` and overwrite numeric metadata values in place (gguf-py, read-write memory map)."""
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    for key, value in values.items():
        field = reader.fields[key.replace("__", ".")]
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return dst


@pytest.mark.parametrize(
    "forged,fragment",
    [
        ({"llama__block_count": 1_000_000}, "llama.block_count = 1000000 is outside 1..1,024"),
        ({"llama__block_count": 3}, "llama.block_count = 3, but the file holds blk.0..blk.1, 2 layers"),
        ({"llama__embedding_length": 4_000_000_000}, "llama.embedding_length = 4000000000 is outside"),
        ({"llama__embedding_length": 128}, r"token_embd.weight is \(\d+, 64\), but"),
        ({"llama__attention__head_count": 0}, "llama.attention.head_count = 0 is outside"),
        ({"llama__attention__head_count": 3}, "d_model 64 is not a multiple of n_head 3"),
        ({"llama__feed_forward_length": 4096}, "mis-shaped blk.0.ffn_gate.weight"),
    ],
)
def test_gguf_hyperparameters_are_checked_against_its_tensors(gguf_path, tmp_path, capsys, forged, fragment):
    from felix.ship.export import ExportError, model_from_gguf

    path = _forge(gguf_path, tmp_path / "forged.gguf", **forged)
    with pytest.raises(ExportError, match=fragment) as e:
        model_from_gguf(path)
    assert str(path) in str(e.value)


def _break_utf8(src, dst, key="general.name"):
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = 0xFF  # the first byte of the string: never valid UTF-8
    reader.data.flush()
    del reader
    return dst


def test_gguf_metadata_that_is_not_utf8(gguf_path, tmp_path, capsys):
    from felix.ship.export import model_from_gguf
    from felix.ship.gguf_file import GGUFError

    path = _break_utf8(gguf_path, tmp_path / "bad-utf8.gguf")
    with pytest.raises(GGUFError, match="metadata general.name holds text that is not UTF-8") as e:
        model_from_gguf(path)
    assert str(path) in str(e.value)
    code, err = _cli(["inspect", path], capsys)
    assert code == 2 and str(path) in err and "general.name" in err and "Traceback" not in err


# ------------------------------------------------------------------ the other files a user hands Felix
def test_bad_tokenizer_json(ckpt, tmp_path, capsys):
    from felix.model.tokenizer import Tokenizer, TokenizerError

    directory = _copy(ckpt, tmp_path)
    tok_path = directory / "tokenizer.json"
    no_specials = json.loads(tok_path.read_text())
    no_specials["added_tokens"] = []
    no_specials["model"]["vocab"] = {k: v for k, v in no_specials["model"]["vocab"].items() if "<|" not in k}
    for data, fragment in [
        (b"\x80\x81\xff binary", "as UTF-8 text"),
        (b'{"model": 1}', "not a valid tokenizers"),
        (b"[", "not a valid tokenizers"),
        (json.dumps(no_specials).encode(), "lacks Felix special tokens"),
    ]:
        tok_path.write_bytes(data)
        with pytest.raises(TokenizerError, match=fragment) as e:
            Tokenizer.load(directory)
        assert str(tok_path) in str(e.value)
        code, err = _cli(["export", directory, tmp_path / "out.gguf", "--force"], capsys)
        assert code == 2 and str(tok_path) in err and "Traceback" not in err


def test_corrupt_edits_manifest_and_binary_requests(ckpt, tmp_path, capsys):
    from felix.tools.edit import EditError, load_requests

    directory = _copy(ckpt, tmp_path)
    binary = tmp_path / "requests.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    code, err = _cli(["edit", directory, "--requests", binary, "--out", tmp_path / "out", "--no-null-space"], capsys)
    assert code == 2 and str(binary) in err and "UTF-8" in err and "Traceback" not in err
    for data, fragment in [
        (b"\xff\xff", "as UTF-8 text"),
        (b"{", "as JSON"),
        (b'"text"', "holds a JSON str"),
        (b'{"format": "felix-splice-edits"}', "corrupt or does not match"),
    ]:
        (directory / "edits.json").write_bytes(data)
        (directory / "edits.safetensors").write_bytes(b"")
        if fragment == "corrupt or does not match":
            save_file({"x": torch.zeros(1)}, str(directory / "edits.safetensors"))
        code, err = _cli(["edit", directory, "--list"], capsys)
        assert code == 2 and str(directory / "edits.json") in err and fragment in err and "Traceback" not in err
    with pytest.raises(EditError, match=r"requests.jsonl:2: needs keys prompt and target"):
        bad = tmp_path / "requests.jsonl"
        bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "only"}\n')
        load_requests(bad)


def test_edit_requests_with_line_separators_inside_strings_load(tmp_path):
    from felix.tools.edit import load_requests

    path = tmp_path / "requests.jsonl"
    rows = [{"prompt": "Line\u2028separated", "target": " x\u2029y"}, {"prompt": "next\u0085", "target": " z"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    got = load_requests(path)
    assert [(r.prompt, r.target) for r in got] == [(r["prompt"], r["target"]) for r in rows]


def _spoke_file(path, model, spoke_config):
    from felix.model.spokes import hub_fingerprint

    save_file(
        {"blk.0.spoke.norm.weight": torch.ones(model.cfg.d_model)},
        str(path),
        metadata={"format": "felix-spokes", "hub_fingerprint": hub_fingerprint(model), "spoke_config": spoke_config},
    )
    return path


@pytest.mark.parametrize(
    "spoke_config,fragment",
    [
        ("{not json", "spoke_config metadata is not valid JSON"),
        ("[1, 2]", "is a JSON list, not an object"),
        (json.dumps({"n_layer": 2, "d_model": 64, "n_spokes": 10**9, "spoke_rank": 10**9}), "exceeds"),
        (json.dumps({"n_layer": 2, "d_model": 64, "n_spokes": "4", "spoke_rank": 8}), "n_spokes must be a positive"),
        (
            json.dumps({"n_layer": 2, "d_model": 64, "n_spokes": 2, "spoke_rank": 4, "spoke_layers": [7]}),
            "spoke layer\\(s\\) \\[7\\] outside",
        ),
        (
            json.dumps({"n_layer": 2, "d_model": 64, "n_spokes": 2, "spoke_rank": 4, "spoke_gate_init": "up"}),
            "spoke_gate_init must be two numbers",
        ),
    ],
)
def test_corrupt_spoke_metadata(ckpt, tmp_path, capsys, spoke_config, fragment):
    from felix.model.spokes import SpokeError, load_spokes

    model = load_checkpoint(ckpt)
    path = _spoke_file(tmp_path / "spokes.safetensors", model, spoke_config)
    with pytest.raises(SpokeError, match=fragment) as e:
        load_spokes(model, path)
    assert str(path) in str(e.value)
    code, err = _cli(["export", ckpt, tmp_path / "out.gguf", "--arch", "felix", "--spokes", path], capsys)
    assert code == 2 and str(path) in err and "Traceback" not in err


def test_corrupt_qat_record(ckpt, tmp_path, capsys):
    from felix.model.qat import QAT_FILE, QAT_SCHEMA, read_qat_config

    directory = _copy(ckpt, tmp_path)
    for data, fragment in [
        (b"\xfe\xff\x00", "as UTF-8 text"),
        (b"{", "is not JSON"),
        (
            json.dumps({"schema": QAT_SCHEMA, "mode": "q4_0", "tensor_types": {"a": "zz"}}).encode(),
            "unknown type of tensor 'a' 'zz'",
        ),
        (
            json.dumps({"schema": QAT_SCHEMA, "mode": "q4_0", "activations": "all"}).encode(),
            "unknown activations 'all'",
        ),
        (json.dumps({"schema": QAT_SCHEMA, "mode": "q9"}).encode(), "unknown QAT mode"),
    ]:
        (directory / QAT_FILE).write_bytes(data)
        with pytest.raises(ValueError, match=fragment) as e:
            read_qat_config(directory)
        assert str(directory / QAT_FILE) in str(e.value)
        code, err = _cli(["export", directory, tmp_path / "out.gguf", "--force"], capsys)
        assert code == 2 and str(directory / QAT_FILE) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "report,fragment",
    [
        (b"\xff\x00", "as UTF-8 text"),
        (b"{", "as JSON"),
        (json.dumps({"schema": "felix-fidelity-report", "results": [1]}).encode(), "'results' is a JSON list"),
        (
            json.dumps({"schema": "felix-fidelity-report", "results": {"simulated": "x"}}).encode(),
            "lacks summary.margin.change_quantiles",
        ),
        (
            json.dumps(
                {
                    "schema": "felix-fidelity-report",
                    "results": {"simulated": {"summary": {"margin": {"change_quantiles": {"0.01": "low"}}}}},
                }
            ).encode(),
            r"change_quantiles\['0.01'\] is 'low', not a number",
        ),
    ],
)
def test_corrupt_fidelity_report_for_margin_from(tmp_path, report, fragment):
    from felix.core.quail import CalibrationError, margin_from_fidelity

    path = tmp_path / "fidelity-rq4.json"
    path.write_bytes(report)
    with pytest.raises(CalibrationError, match=fragment) as e:
        margin_from_fidelity(path, 0.01)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ outputs that are inputs; leftovers
def test_export_refuses_to_overwrite_its_own_inputs(ckpt, tmp_path, capsys):
    directory = _copy(ckpt, tmp_path)
    before = {p.name: _sha(p) for p in directory.iterdir()}
    for target in ("model.safetensors", "tokenizer.json", "config.json"):
        code, err = _cli(["export", directory, directory / target, "--force"], capsys)
        assert code == 2 and "is an input of this export" in err, err
    link = tmp_path / "alias.gguf"
    link.symlink_to(directory / "model.safetensors")
    code, err = _cli(["export", directory, link, "--force"], capsys)
    assert code == 2 and "is an input of this export" in err
    code, err = _cli(
        ["export", directory, tmp_path / "m.gguf", "--splice", "adapter", "--adapter-out", tmp_path / "m.gguf"], capsys
    )
    assert code == 2 and "both be written to" in err
    assert {p.name: _sha(p) for p in directory.iterdir()} == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_export_removes_what_killed_exports_left_behind(ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    dead = tmp_path / f".m.gguf.tmp-{_dead_pid()}"
    live = tmp_path / f".m.gguf.tmp-{os.getppid()}"
    dead.write_bytes(b"\0" * 4096)
    live.write_bytes(b"\0" * 16)
    code, err = _cli(["export", ckpt, out, "--quant", "f32"], capsys)
    assert code == 0, err
    assert out.is_file() and not dead.exists() and live.exists()


# ------------------------------------------------------------------ no file Felix reads can run code
def test_pickle_payloads_planted_in_every_file_felix_reads_do_not_run(ckpt, tmp_path, gguf_path):
    from felix.tools import edit as felix_edit
    from felix.data.corpus import load_teacher_records, load_user_data
    from felix.train.distill import load_teacher_groups
    from felix.ship.export import model_from_gguf
    from felix.verify.fidelity import load_probes
    from felix.ship.gguf_file import open_gguf
    from felix.ship.llamacpp import LlamaCppModel
    from felix.model.qat import read_qat_config
    from felix.core.quail import margin_from_fidelity
    from felix.model.spokes import load_spokes
    from felix.model.tokenizer import Tokenizer

    marker = tmp_path / "PAYLOAD_RAN"
    raw = pickle_payload(marker)
    zipped = tmp_path / "zipped.pt"
    torch.save(PicklePayload(marker), zipped)  # torch.save's zip form, what torch.load(weights_only=False) runs
    pickle.loads(raw)  # the payload is live: unpickling it does write the marker
    assert marker.exists()
    marker.unlink()
    model = load_checkpoint(ckpt)

    copies = iter(range(1000))

    def planted(name, payload):
        directory = _copy(ckpt, tmp_path, f"ck-{next(copies)}")
        (directory / name).write_bytes(payload)
        return directory

    for payload in (raw, zipped.read_bytes()):
        loaders = [
            (CONFIG_FILE, lambda d: load_config(d)),
            (WEIGHTS_FILE, lambda d: load_checkpoint(d)),
            ("tokenizer.json", lambda d: Tokenizer.load(d)),
            ("qat.json", lambda d: read_qat_config(d)),
            ("edits.json", lambda d: felix_edit.resume_editor(model, None, d)),
            ("spokes.safetensors", lambda d: load_spokes(model, d / "spokes.safetensors")),
            ("m.gguf", lambda d: open_gguf(d / "m.gguf")),
            ("m.gguf", lambda d: model_from_gguf(d / "m.gguf")),
            ("m.gguf", lambda d: LlamaCppModel(d / "m.gguf")),
            ("data.jsonl", lambda d: load_user_data([d / "data.jsonl"])),
            ("teacher.jsonl", lambda d: load_teacher_records([d / "teacher.jsonl"])),
            ("teacher.jsonl", lambda d: load_teacher_groups([d / "teacher.jsonl"])),
            ("probes.jsonl", lambda d: load_probes(d / "probes.jsonl")),
            ("requests.jsonl", lambda d: felix_edit.load_requests(d / "requests.jsonl")),
            ("fidelity-rq4.json", lambda d: margin_from_fidelity(d / "fidelity-rq4.json")),
        ]
        for name, load in loaders:
            directory = planted(name, payload)
            with pytest.raises((ValueError, ImportError)) as e:  # ImportError: no llama.cpp here
                load(directory)
            assert isinstance(e.value, ImportError) or name in str(e.value) or str(directory) in str(e.value), (
                name,
                str(e.value)[:300],
            )
            assert not marker.exists(), f"loading a planted {name} ran the payload"
        # and edits.safetensors beside a readable manifest
        directory = planted("edits.safetensors", payload)
        (directory / "edits.json").write_text("{}")
        with pytest.raises(ValueError):
            felix_edit.resume_editor(model, None, directory)
        assert not marker.exists()
    # the GGUF really is one Felix reads (the loaders above were refused for the payload, not for the name)
    assert open_gguf(gguf_path) is not None


def test_felix_has_no_pickle_loading_path_outside_the_trainer():
    """Source check backing the planted-payload test: no torch.load without weights_only=True and no pickle.load
    of a file anywhere in felix/ (felix/train/loop.py's trainer state is issue32-runs' part; the llama.cpp worker
    pipe speaks pickle to Felix's own child process, never to a file)."""
    import felix

    root = os.path.dirname(felix.__file__)
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py") or f == "train.py":
                continue
            path = os.path.join(dirpath, f)
            for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    offenders.append(f"{path}:{lineno}")
                if ("pickle.load(" in line or "pickle.loads(" in line) and not f == "llamacpp.py":
                    offenders.append(f"{path}:{lineno}")
    assert not offenders, offenders
