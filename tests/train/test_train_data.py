"""`felix train` on prepared token shards (felix/train/run_data.py): a two-source mix from a run config, exact resume with
`--resume --out-dir` alone, per-source metrics, and the data errors a resume or a mismatched source must give."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from safetensors.torch import load_file

from felix.cli.main import main
from felix.data.shards import prepare_corpus
from felix.model.tokenizer import save_tokenizer_file
from felix.data.tokenizer_training import train_tokenizer_from_sources

WORDS_A = "alpha beta gamma delta river stone cloud metal paper garden".split()
WORDS_B = '{ } : " , true false null key value list item'.split()


def write_jsonl(path, words, n_docs, seed, length=40):
    rng = random.Random(seed)
    path.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(length))}) + "\n" for _ in range(n_docs))
    )
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two prepared sources (prose-like words, JSON-like tokens) with one tokenizer."""
    root = tmp_path_factory.mktemp("corpora")
    a = write_jsonl(root / "a.jsonl", WORDS_A, 60, seed=1)
    b = write_jsonl(root / "b.jsonl", WORDS_B, 40, seed=2)
    tok, _ = train_tokenizer_from_sources([a, b], vocab_size=300)
    tok_path = save_tokenizer_file(tok, root / "tokenizer.json")
    for name, src in (("web", a), ("json", b)):
        prepare_corpus([src], tok_path, root / name, workers=1, val_fraction=0.2, progress=False, log=lambda m: None)
    return root


def write_config(path, corpora, **over):
    config = {
        "model": {"preset": "tiny"},
        "data": {
            "sources": {
                "web": {"path": str(corpora / "web"), "weight": 0.7},
                "json": {"path": str(corpora / "json"), "weight": 0.3},
            },
            "tokenizer": str(corpora / "tokenizer.json"),
            "seq_len": 32,
        },
        "optimizer": {"lr": 3e-3, "batch_size": 4},
        "schedule": {"steps": 12, "warmup_steps": 2},
        "eval": {"eval_every": 6, "eval_batches": 1},
        "parallel": {"device": "cpu"},
    }
    for key, value in over.items():
        section, field = key.split("__")
        config[section][field] = value
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_mix_resumes_exactly_from_the_run_directory_alone(tmp_path, corpora, capsys):
    config = write_config(tmp_path / "run.yaml", corpora)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(config), "--out-dir", str(full)]) == 0
    assert main(["train", "--config", str(config), "--out-dir", str(split), "--stop-at", "10"]) == 0
    assert main(["train", "--resume", "--out-dir", str(split)]) == 0  # nothing else: OUT/run.yaml has the rest
    a, b = (
        load_file(str(full / "checkpoint" / "model.safetensors")),
        load_file(str(split / "checkpoint" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-exact on CPU
    drop = ("tokens_per_s", "mfu", "peak_memory_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(full)] == [
        {k: v for k, v in r.items() if k not in drop} for r in metrics(split)
    ]
    last = metrics(full)[-1]
    # the realized mix: 12 steps x 4 rows, each source within the schedule's bound (S - 1/2 = 1.5 samples)
    n = 12 * 4
    assert sum(last["source_samples"].values()) == n
    assert abs(last["source_samples"]["web"] - 0.7 * n) <= 1.5 and abs(last["source_samples"]["json"] - 0.3 * n) <= 1.5
    # per-source validation, and the overall CE weighted as the mix weighs the sources
    by_source = last["val_ce_by_source"]
    assert set(by_source) == {"web", "json"}
    assert last["val_ce"] == pytest.approx(0.7 * by_source["web"] + 0.3 * by_source["json"], rel=1e-12)
    assert set(last["source_epochs"]) == {"web", "json"}
    assert (full / "run.yaml").is_file() and (full / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_one_prepared_directory_needs_no_config(tmp_path, corpora):
    out = tmp_path / "one"
    args = [
        "train",
        "--data",
        str(corpora / "web"),
        "--out-dir",
        str(out),
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0  # the tokenizer is the one the manifest names
    record = metrics(out)[-1]
    assert record["source_samples"] == {"web": 4} and set(record["val_ce_by_source"]) == {"web"}
    assert not (out / "data").exists()  # a prepared source is read in place, nothing is copied


def test_resume_refuses_changed_or_missing_data(tmp_path, corpora, capsys):
    local = tmp_path / "corpora"
    shutil.copytree(corpora, local)
    config = write_config(tmp_path / "run.yaml", local)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out-dir", str(out), "--stop-at", "2"]) == 0
    capsys.readouterr()
    # the json source prepared again from other documents: same path, different tokens
    write_jsonl(tmp_path / "b2.jsonl", WORDS_B, 40, seed=99)
    prepare_corpus(
        [tmp_path / "b2.jsonl"],
        local / "tokenizer.json",
        local / "json",
        workers=1,
        val_fraction=0.2,
        force=True,
        progress=False,
        log=lambda m: None,
    )
    assert main(["train", "--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "source 'json': fingerprint" in err
    shutil.rmtree(local / "json")
    assert main(["train", "--resume", "--out-dir", str(out)]) == 2
    assert "cannot resume: data source 'json'" in capsys.readouterr().err


def test_bad_data_settings_exit_2(tmp_path, corpora, capsys):
    other = write_jsonl(tmp_path / "c.jsonl", WORDS_A, 20, seed=3)
    tok, _ = train_tokenizer_from_sources([other], vocab_size=280)
    save_tokenizer_file(tok, tmp_path / "other-tokenizer.json")
    config = write_config(tmp_path / "run.yaml", corpora)
    base = ["train", "--config", str(config), "--out-dir", str(tmp_path / "x")]
    assert main(base + ["--tokenizer", str(tmp_path / "other-tokenizer.json")]) == 2
    assert "data source 'web'" in capsys.readouterr().err  # prepared with another tokenizer: names the source
    assert main(base + ["--set", "data.sources.web.weight=-0.7"]) == 2
    assert "finite and >= 0; got web: -0.7" in capsys.readouterr().err
    assert main(base + ["--set", "data.sources.web.weight=0", "--set", "data.sources.json.weight=0"]) == 2
    assert "sum to zero" in capsys.readouterr().err
    assert main(base + ["--set", "data.sources.web.path=" + str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "data source 'web'" in err and "does not exist" in err


def test_a_data_file_prepared_on_the_fly_resumes_from_a_moved_run_and_refuses_an_edited_file(tmp_path, corpora, capsys):
    """A --data file is prepared into OUT/data/NAME; resume compares the file's bytes (size, sha256) with what was
    prepared, not its path or time: a moved run directory resumes, an edited file is refused by name."""
    src = write_jsonl(tmp_path / "notes.jsonl", WORDS_A, 30, seed=5)
    out = tmp_path / "run"
    args = [
        "--out-dir",
        str(out),
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--tokenizer",
        str(corpora / "tokenizer.json"),
    ]
    assert main(["train", "--data", str(src), "--stop-at", "2", *args]) == 0
    assert (out / "data" / "notes" / "manifest.json").is_file()
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert main(["train", "--resume", "--out-dir", str(moved)]) == 0
    assert [r["step"] for r in metrics(moved)] == [2, 4]
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["train", "--data", str(src), "--stop-at", "2", *args[2:], "--out-dir", str(again)]) == 0
    write_jsonl(src, WORDS_A, 30, seed=6)  # same path, other content
    assert main(["train", "--resume", "--out-dir", str(again)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume: data source 'notes'" in err and str(src) in err and "changed" in err
