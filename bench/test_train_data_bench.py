"""The trainer's data path on prepared token shards (felix/data/mix.py, felix/train/run_data.py): loader throughput and the
trainer's resident memory against corpus size.

* Loader: [8, 2048] int64 (inputs, targets) batches from a 0.7/0.3 mix of two prepared sources (MixStream:
  O(1) sample lookup + memory-mapped TokenArray reads), against the in-RAM loader it replaces
  (felix.data.corpus.TokenStream over one int64 tensor of the same tokens). Goal (reported, not asserted): >= 100x
  what felix-300m consumes on one RX 7800 XT (~6,500 tokens/s in the seed's estimate), i.e. >= 650,000 tokens/s.
* Memory: peak RSS of `felix train` (tiny preset, 3 steps, one prepared source) in a fresh process, on prepared
  corpora of 10x and 100x the tokens of a base corpus. Goal: growth < 0.01 byte per token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)
from felix.data.corpus import TokenStream
from felix.data.mix import MixStream
from felix.data.shards import prepare_corpus
from felix.testing.corpus import write_text_corpus
from felix.model.tokenizer import save_tokenizer_file
from felix.data.tokenizer_training import train_tokenizer_from_sources

ROOT = Path(__file__).resolve().parents[1]
GOAL_TOKENS_PER_S = 100 * 6_500
BATCH, SEQ = (4, 256) if QUICK else (8, 2048)
BASE_BYTES = 25_000 if QUICK else 250_000  # the "1x" corpus; the memory cases use 10x and 100x of it
SCALES = (10, 100)
RSS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A tokenizer (vocab 2048, the tiny preset's) and prepared corpora: "web" and "code" for the mix, and one per
    memory scale, all from felix.testing.corpus (no download)."""
    root = tmp_path_factory.mktemp("train-data")
    sizes = {
        "web": 70 * BASE_BYTES // 10 * (1 if QUICK else 4),
        "code": 30 * BASE_BYTES // 10 * (1 if QUICK else 4),
        **{f"x{s}": s * BASE_BYTES for s in SCALES},
    }
    for i, (name, size) in enumerate(sizes.items()):
        write_text_corpus(root / f"{name}.jsonl", size, seed=i)
    tok, _ = train_tokenizer_from_sources([root / "web.jsonl"], 2048, max_chars=2_000_000)
    tok_path = save_tokenizer_file(tok, root / "tokenizer.json")
    prepared = {
        name: prepare_corpus(
            [root / f"{name}.jsonl"], tok_path, root / name, val_fraction=0.005, progress=False, log=lambda m: None
        )
        for name in sizes
    }
    return root, tok_path, prepared


@pytest.mark.parametrize("impl", ["felix-mix-shards", "in-RAM TokenStream"])
def test_loader_throughput(measure, benchmark, corpora, impl):
    _, _, prepared = corpora
    arrays = [prepared["web"].split("train"), prepared["code"].split("train")]
    if impl == "felix-mix-shards":
        stream = MixStream(arrays, [0.7, 0.3], SEQ, seed=0, names=["web", "code"])
    else:  # the loader this replaces: every token of the corpus as one int64 tensor in RAM
        tokens = torch.from_numpy(np_concat([a.read(0, a.n_tokens) for a in arrays]).astype("int64"))
        stream = TokenStream(tokens, SEQ, seed=0)
    steps = 4 if QUICK else 32

    def load():
        for _ in range(steps):
            stream.next_batch(BATCH)

    measure(
        torch.device("cpu"),
        f"loader [{BATCH}, {SEQ}] x {steps} batches, 0.7/0.3 mix",
        impl,
        load,
        bytes_moved=steps * BATCH * (SEQ + 1) * 8,
        candidate=impl == "felix-mix-shards",
    )
    if benchmark.stats is not None:
        tokens_per_s = steps * BATCH * SEQ / benchmark.stats.stats.median
        benchmark.extra_info.update(tokens_per_s=tokens_per_s, x_goal=tokens_per_s / GOAL_TOKENS_PER_S)
        print(
            f"\n{impl}: {tokens_per_s:,.0f} tokens/s = {tokens_per_s / GOAL_TOKENS_PER_S:.1f}x the goal "
            f"({GOAL_TOKENS_PER_S:,} tokens/s)"
        )


def np_concat(parts):
    import numpy as np

    return np.concatenate(parts)


def train_peak_rss(data_dir: Path, tok_path: Path, out: Path) -> dict:
    """Peak RSS (MiB) of a fresh `felix train` process: 3 steps of the tiny preset on one prepared source."""
    cmd = [
        sys.executable,
        "-m",
        "felix",
        "train",
        "--data",
        str(data_dir),
        "--tokenizer",
        str(tok_path),
        "--out-dir",
        str(out),
        "--steps",
        "3",
        "--warmup-steps",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "128",
        "--device",
        "cpu",
    ]
    code = (
        "import resource, subprocess, sys, json; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env, check=True)
    return {"peak_rss_mib": json.loads(run.stdout.strip().splitlines()[-1]) / 1024}


@pytest.mark.parametrize("scale", SCALES)
def test_train_peak_rss_against_corpus_tokens(measure, benchmark, corpora, tmp_path, scale):
    root, tok_path, prepared = corpora
    corpus = prepared[f"x{scale}"]
    tokens = corpus.split("train").n_tokens + corpus.split("val").n_tokens
    result = {}

    def run():
        result.update(train_peak_rss(root / f"x{scale}", tok_path, tmp_path / f"run{scale}"))

    measure(
        torch.device("cpu"),
        "felix train tiny, 3 steps, one prepared source",
        f"{scale}x corpus ({tokens:,} tokens)",
        run,
        rounds=1,
        candidate=scale == SCALES[-1],
        extra=lambda: {**result, "tokens": tokens},
    )
    if not result:
        run()
    RSS[scale] = {**result, "tokens": tokens}
    benchmark.extra_info.update(RSS[scale])
    if len(RSS) == len(SCALES):
        lo, hi = RSS[SCALES[0]], RSS[SCALES[-1]]
        growth = (hi["peak_rss_mib"] - lo["peak_rss_mib"]) * 2**20 / (hi["tokens"] - lo["tokens"])
        benchmark.extra_info["rss_growth_bytes_per_token"] = growth
        print(
            f"\npeak RSS {lo['peak_rss_mib']:.1f} MiB at {lo['tokens']:,} tokens, {hi['peak_rss_mib']:.1f} MiB at "
            f"{hi['tokens']:,}: growth {growth:.5f} bytes/token (goal < 0.01)"
        )
