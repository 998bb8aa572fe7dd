"""Trainer: WSD schedule, exact resume, memorization monitor, metrics/plot outputs, bad input."""

from __future__ import annotations

import json
import random

import pytest

from felix.cli.main import main
from felix.data import corpus as data
from felix.model import chat
from felix.model.tokenizer import train_tokenizer
from felix.train.loop import MemorizationMonitor, TrainConfig, train, wsd_lr

WORDS = (
    "alpha beta gamma delta river stone cloud metal paper garden window silver orange tiger maple "
    "copper winter summer rocket pencil"
).split()


def write_docs(path, n_docs, seed, words=30):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return str(path)


def tiny_run(tmp_path, name, **kw):
    base = dict(
        preset="tiny",
        out_dir=str(tmp_path / name),
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        steps=24,
        lr=3e-3,
        warmup_steps=4,
        eval_every=6,
        eval_batches=2,
        seed=0,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def test_wsd_schedule_shape():
    total, peak, warmup, decay = 100, 1e-3, 10, 20
    lrs = [wsd_lr(s, total, peak, warmup, decay, final_fraction=0.1) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup])) and lrs[warmup - 1] == peak
    assert lrs[0] == pytest.approx(peak / warmup)
    assert all(lr == peak for lr in lrs[warmup : total - decay])
    tail = lrs[total - decay :]
    assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] == pytest.approx(0.1 * peak)
    assert tail[0] - tail[1] == pytest.approx(tail[-2] - tail[-1])  # linear decay


def test_monitor_logic():
    m = MemorizationMonitor(gap=0.1, min_wraps=3)
    assert m.check(10, train_loss=2.0, val_loss=1.5, wraps=2) is None  # not wrapped enough yet
    assert m.check(20, train_loss=2.0, val_loss=1.85, wraps=5) is None  # within the gap
    assert m.check(30, train_loss=2.0, val_loss=2.5, wraps=9) is None  # ordinary overfitting
    assert "MEMORIZATION" in m.check(40, train_loss=2.0, val_loss=1.5, wraps=4) and len(m.alerts) == 1


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", 40, seed=1)
    full = train(tiny_run(tmp_path, "full", data=[docs], grad_accum=2), log=lambda *_: None)
    cfg = tiny_run(tmp_path, "split", data=[docs], grad_accum=2)
    first = train(cfg, stop_at=10, log=lambda *_: None)
    assert len(first.step_losses) == 10
    resumed = train(cfg, resume=True, log=lambda *_: None)
    assert resumed.step_losses == full.step_losses  # bit-exact on CPU
    assert [m["val_ce"] for m in resumed.metrics] == [m["val_ce"] for m in full.metrics]
    assert full.step_losses[-1] < full.step_losses[0] - 1.0
    out = tmp_path / "full"
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [6, 12, 18, 24]
    assert {"train_ce", "train_hinge", "val_ce", "tokens_per_s", "mfu", "peak_memory_mb", "corpus_wraps"} <= set(
        lines[0]
    )
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json",
        "model.safetensors",
        "run.yaml",
        "tokenizer.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]


def test_memorization_monitor_fires_on_a_leaky_wrapped_corpus(tmp_path):
    """Two validation documents also sit 8 times each in a tiny training corpus: after a few wraps the model
    recites them, and validation loss drops clearly below the training loss at the same weights."""
    val = write_docs(tmp_path / "val.jsonl", 2, seed=102)
    lines = (
        open(write_docs(tmp_path / "other.jsonl", 20, seed=3)).read().splitlines() + open(val).read().splitlines() * 8
    )
    random.Random(0).shuffle(lines)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match="MEMORIZATION SIGNATURE"):
        result = train(
            tiny_run(tmp_path, "leaky", data=[str(tmp_path / "train.jsonl")], val_data=[val], steps=120, eval_every=20),
            log=lambda *_: None,
        )
    flagged = [m for m in result.metrics if m["memorization"]]
    assert result.memorization_alerts and flagged
    assert all(m["corpus_wraps"] >= 3 and m["val_ce"] < 0.9 * m["train_eval_ce"] for m in flagged)


def test_memorization_monitor_quiet_on_a_healthy_split(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", 20, seed=4)
    result = train(
        tiny_run(tmp_path, "healthy", data=[docs], val_fraction=0.2, steps=120, eval_every=20), log=lambda *_: None
    )
    assert result.metrics[-1]["corpus_wraps"] >= 5  # wrapped as often, but validation is really held out
    assert not result.memorization_alerts and not any(m["memorization"] for m in result.metrics)


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="exceed steps"):
        TrainConfig(steps=10, warmup_steps=9, decay_fraction=0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n{"prompt": 1}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2(.|\n)*bad.jsonl:3"):
        train(tiny_run(tmp_path, "bad", data=[str(bad)]), log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(tiny_run(tmp_path, "never"), resume=True, log=lambda *_: None)


def write_teacher(path, n, seed, bad_lines=()):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(4)]
        lines.append(
            json.dumps(
                {
                    "prompt": "tag: " + " ".join(words),
                    "response": json.dumps({"concepts": sorted(set(words))}),
                    "teacher": ("qwen", "gemma")[i % 2],
                }
            )
        )
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_sft_stream_learns_only_the_response(tmp_path):
    records, skipped = data.load_teacher_records(
        [write_teacher(tmp_path / "t.jsonl", 6, seed=1, bad_lines=[(2, '{"prompt": "p", "response": "r"}')])]
    )
    assert len(records) == 6 and skipped and skipped[0].startswith(f"{tmp_path / 't.jsonl'}:3:")
    tok = train_tokenizer([chat.chat_text(r["prompt"], r["response"]) for r in records], vocab_size=300)
    stream = data.SFTStream(records, tok, seq_len=96)
    x, y = stream.fixed_batches(6, 1)[0]
    for row_x, row_y in zip(x, y):
        learned = row_y[row_y != -100].tolist()
        record = next(
            r
            for r in records
            if tok.encode(chat.chat_prompt(r["prompt"]))
            == row_x[1 : 1 + len(tok.encode(chat.chat_prompt(r["prompt"])))].tolist()
        )
        assert tok.decode(learned) == record["response"] + chat.END + "<|eos|>"
    with pytest.raises(data.DataError, match="longer than seq_len"):
        data.SFTStream(records, tok, seq_len=4)


def test_distillation_run_and_init_from(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.jsonl", 40, seed=2, bad_lines=[(5, "garbage")])
    logs = []
    first = train(
        tiny_run(tmp_path, "distill", teacher_data=[teacher], seq_len=64, steps=30, val_fraction=0.2, eval_every=10),
        log=logs.append,
    )
    assert any("qwen 20, gemma 20" in line for line in logs) and any("teacher.jsonl:6" in line for line in logs)
    assert first.step_losses[-1] < 0.5 * first.step_losses[0]
    assert first.metrics[-1]["val_ce"] < 0.5 * first.step_losses[0]
    again = train(
        tiny_run(
            tmp_path,
            "distill2",
            teacher_data=[teacher],
            seq_len=64,
            steps=2,
            warmup_steps=1,
            decay_fraction=0.0,
            init_from=str(tmp_path / "distill" / "checkpoint"),
        ),
        log=lambda *_: None,
    )
    assert again.step_losses[0] < 0.5 * first.step_losses[0]  # starts where the first run ended
    with pytest.raises(ValueError, match="separate runs"):
        tiny_run(tmp_path, "x", teacher_data=[teacher], data=[teacher])


def test_felix_train_cli(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", 20, seed=5)
    args = [
        "train",
        "--out-dir",
        str(tmp_path / "cli"),
        "--data",
        docs,
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
    ]
    assert main(args) == 0
    assert len((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()) == 2
    (tmp_path / "bad.jsonl").write_text("nope\n")
    assert main(["train", "--out-dir", str(tmp_path / "cli2"), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_resumed_run_metrics_file_has_each_record_once(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", 20, seed=6)
    cfg = tiny_run(tmp_path, "m", data=[docs], steps=8, warmup_steps=1, eval_every=2, eval_batches=1)
    train(cfg, stop_at=4, log=lambda *_: None)
    assert [json.loads(s)["step"] for s in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    train(cfg, resume=True, log=lambda *_: None)
    assert [json.loads(s)["step"] for s in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
