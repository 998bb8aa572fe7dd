"""Pretraining data benchmarks: `felix data prepare` (felix.data.shards.prepare_corpus) against HF tokenizers' own
``encode_batch`` on the same text in one process and one thread (the tokenizer's limit per core), and reads of
training windows from the memory-mapped shards.

Cases (CPU; the corpus is felix.testing.corpus's synthetic prose, FELIX_BENCH_DATA_MB megabytes, default 4):

* "tokenize <corpus>": peer "hf-encode_batch-1-thread" (texts already in memory, TOKENIZERS_PARALLELISM=false);
  candidates "felix-prepare-1-worker" and "felix-prepare-2-workers" (read + parse JSONL, hash, encode, write
  shards, manifest). extra: tokens/s, per_worker_vs_encode_batch (goal >= 0.8; near-linear in workers means the
  2-worker figure stays near the 1-worker one), bytes_per_token on disk (2 for uint16).
* "read 2049-token windows": TokenArray.read of random windows from the shards vs slicing the same tokens held in
  RAM as one numpy array. extra: tokens/s served.

Timings depend on what else runs on the machine: compare ratios within one run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil

import numpy as np
import pytest
import torch

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)
from felix.data.shards import BATCH_CHARS, PreparedCorpus, prepare_corpus
from felix.testing.corpus import write_text_corpus
from felix.model.tokenizer import Tokenizer, save_tokenizer_file
from felix.data.tokenizer_training import train_tokenizer_from_sources

CORPUS_BYTES = 200_000 if QUICK else int(float(os.environ.get("FELIX_BENCH_DATA_MB", "4")) * 1e6)
VOCAB = 2048 if QUICK else 8192
WINDOW = 2049
CPU = torch.device("cpu")
_BASELINE: dict[str, float] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-bench")
    src = root / "corpus.jsonl"
    stats = write_text_corpus(src, CORPUS_BYTES, seed=0)
    tok, _ = train_tokenizer_from_sources([src], VOCAB, max_chars=2_000_000)
    tok_file = root / "tokenizer.json"
    save_tokenizer_file(tok, tok_file)
    texts = [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()]
    return {"root": root, "src": src, "tokenizer": tok_file, "texts": texts, "stats": stats}


def _case(corpus) -> str:
    return f"tokenize {corpus['stats']['bytes'] / 1e6:.1f} MB prose JSONL vocab {VOCAB}"


def test_encode_batch_one_thread(measure, corpus):
    hf = Tokenizer.load(corpus["tokenizer"]).hf
    texts = corpus["texts"]
    batches, batch, chars = [], [], 0
    for t in texts:  # the same batch sizes prepare sends its workers
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    hf.encode_batch(texts[:1])  # warm-up
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        _BASELINE["tokens"] = sum(len(e.ids) + 2 for b in batches for e in hf.encode_batch(b))

        def run():
            # a fresh tokenizer per run, as every prepare loads one per worker: the BPE model's word cache starts
            # cold (a warm cache from the previous round made encode_batch 2x faster on this repetitive corpus)
            fresh = Tokenizer.load(corpus["tokenizer"]).hf
            cpu = _cpu_seconds()
            for b in batches:
                fresh.encode_batch(b)
            _BASELINE["cpu_s"] = _cpu_seconds() - cpu

        measure(
            CPU,
            _case(corpus),
            "hf-encode_batch-1-thread",
            run,
            bytes_moved=corpus["stats"]["bytes"],
            rounds=3,
            extra=lambda: {"tokens_per_cpu_s": _BASELINE["tokens"] / _BASELINE["cpu_s"]},
        )
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare(measure, benchmark, corpus, workers):
    out = corpus["root"] / f"prepared-{workers}"
    cpu = {}

    def run():
        shutil.rmtree(out, ignore_errors=True)
        own, kids = _cpu_seconds(), _cpu_seconds(resource.RUSAGE_CHILDREN)
        prepare_corpus([corpus["src"]], corpus["tokenizer"], out, workers=workers, progress=False)
        cpu.update(main=_cpu_seconds() - own, workers=_cpu_seconds(resource.RUSAGE_CHILDREN) - kids)

    def extra():
        c = PreparedCorpus.open(out)
        tokens = sum(c.split(s).n_tokens for s in ("train", "val"))
        disk = sum(e["bytes"] for s in ("train", "val") for e in c.manifest["splits"][s]["shards"])
        row = {
            "tokens": tokens,
            "tokens_per_s": tokens / benchmark.stats.stats.median,
            "bytes_per_token": disk / tokens,
        }
        base = _find_baseline_seconds()
        if base:
            row["per_worker_vs_encode_batch"] = base / benchmark.stats.stats.median / workers
        # CPU time, which other load on the machine barely moves: tokens per CPU-second of the encoding processes
        # (the pool's workers; with one worker the main process, which also reads), against encode_batch's
        encode_cpu = cpu["workers"] if workers > 1 else cpu["main"]
        row["main_cpu_s"], row["workers_cpu_s"] = cpu["main"], cpu["workers"]
        if "cpu_s" in _BASELINE:
            row["per_worker_cpu_vs_encode_batch"] = (tokens / encode_cpu) / (_BASELINE["tokens"] / _BASELINE["cpu_s"])
        return row

    measure(
        CPU,
        _case(corpus),
        f"felix-prepare-{workers}-worker{'s' if workers > 1 else ''}",
        run,
        bytes_moved=corpus["stats"]["bytes"],
        candidate=True,
        rounds=3,
        extra=extra,
    )


def _cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _find_baseline_seconds() -> float | None:
    from conftest import recorder_for

    for m in recorder_for(CPU).measurements:
        if m.impl == "hf-encode_batch-1-thread" and m.case.startswith("tokenize "):
            return m.seconds
    return None


@pytest.fixture(scope="module")
def train_split(corpus):
    out = corpus["root"] / "prepared-read"
    shutil.rmtree(out, ignore_errors=True)
    return prepare_corpus(
        [corpus["src"]], corpus["tokenizer"], out, workers=1, shard_tokens=200_000, progress=False
    ).split("train")


@pytest.mark.parametrize("impl", ["felix-TokenArray.read-memmap", "numpy-slice-in-ram"])
def test_read_windows(measure, benchmark, train_split, impl):
    train = train_split
    starts = np.random.default_rng(0).integers(0, train.n_tokens - WINDOW, size=512)
    if impl.startswith("felix"):
        fn = lambda: [train.read(s, WINDOW) for s in starts]  # noqa: E731
    else:
        in_ram = train.read(0, train.n_tokens)
        fn = lambda: [in_ram[s : s + WINDOW].copy() for s in starts]  # noqa: E731
    measure(
        CPU,
        f"read {len(starts)} random {WINDOW}-token windows ({len(train.paths)} shards)",
        impl,
        fn,
        bytes_moved=len(starts) * WINDOW * train.dtype.itemsize,
        candidate=impl.startswith("felix"),
        extra=lambda: {"tokens_per_s": len(starts) * WINDOW / benchmark.stats.stats.median},
    )
