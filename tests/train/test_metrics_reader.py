"""felix.train.runs.read_metrics, the one reader of a run's metrics.jsonl: it gives back exactly the records the
trainer wrote, and a bad file is refused with every bad line named as path:line."""

from __future__ import annotations

import json
import random
import re

import pytest

from felix.core.files import jsonable
from felix.train.loop import TrainConfig, train
from felix.train.runs import METRICS_FILE, read_metrics

WORDS = "alpha beta gamma delta river stone cloud metal paper garden window silver orange tiger maple".split()


def test_reads_what_the_trainer_writes(tmp_path):
    rng = random.Random(0)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n" for _ in range(20))
    )
    out = tmp_path / "run"
    cfg = TrainConfig(
        preset="tiny",
        out_dir=str(out),
        data=[str(docs)],
        vocab_size=300,
        seq_len=32,
        batch_size=2,
        steps=4,
        lr=3e-3,
        warmup_steps=1,
        eval_every=2,
        eval_batches=1,
        seed=0,
        device="cpu",
    )
    result = train(cfg, log=lambda *_: None)
    records = read_metrics(out)  # the run directory ...
    assert records == read_metrics(out / METRICS_FILE)  # ... or the file itself
    assert [r["step"] for r in records] == [2, 4]
    assert records == jsonable(result.metrics)  # every field, as the trainer held it (JSON has no NaN: None)
    assert {"train_ce", "val_ce", "tokens_per_s", "peak_memory_mb"} <= set(records[0])


def test_bad_lines_are_named_by_path_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    good = json.dumps({"step": 2, "note": "a\u2028b"}, ensure_ascii=False)  # U+2028 inside a string: one line
    path.write_text("\n".join([good, "", "{not json", "[1, 2]", good, '{"step": 4}']) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_metrics(tmp_path)
    message = str(e.value)
    assert f"{path}:3: not valid JSON" in message
    assert f"{path}:4: a JSON list, expected an object" in message
    assert f"{path}:1" not in message and f"{path}:5" not in message and f"{path}:6" not in message
    path.write_text("\n".join([good, "", good, '{"step": 4}']) + "\n", encoding="utf-8")
    assert read_metrics(path) == [{"step": 2, "note": "a\u2028b"}] * 2 + [{"step": 4}]  # blank lines skipped


def test_missing_or_binary_file_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"metrics file {tmp_path / METRICS_FILE} does not exist")):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {tmp_path / METRICS_FILE} as UTF-8")):
        read_metrics(tmp_path / METRICS_FILE)
