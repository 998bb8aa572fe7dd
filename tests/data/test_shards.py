"""Token shards (felix.data.shards) and the pretraining sources they read (felix.data.sources): round trip against the
tokenizer itself, dtype choice, reads across shard boundaries, the content-hash validation split, interrupted and
repeated prepares, every source kind and the errors of bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import felix.data.shards as shards
from felix.cli.main import main
from felix.data.sources import SourceReader, expand_sources
from felix.data.corpus import DataError
from felix.model.chat import chat_text
from felix.data.shards import HEADER_BYTES, PreparedCorpus, ShardError, dtype_for_vocab, prepare_corpus
from felix.testing.corpus import text_documents
from felix.model.tokenizer import Tokenizer, save_tokenizer_file, train_tokenizer


def docs(n: int, seed: int = 0) -> list[str]:
    stream = text_documents(seed, max_paragraphs=3)
    return [next(stream)[:600] for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer_file(train_tokenizer(docs(300, seed=1), vocab_size=400), path)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer.load(tokenizer_file)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def expected_tokens(texts, tok, val_fraction):
    """The documented layout, computed independently: bos + tokenizer.encode(text) + eos per document in source
    order, a document in "val" iff sha256(text)[:8] as a big-endian fraction of 2**64 is below val_fraction."""
    out = {"train": [], "val": []}
    for t in texts:
        frac = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64
        out["val" if frac < val_fraction else "train"] += [tok.bos_id, *tok.encode(t), tok.eos_id]
    return out


def raw_shard_tokens(corpus, split):
    """Every shard file of a split read with np.fromfile past the header (not through TokenArray)."""
    files = [corpus.path / e["file"] for e in corpus.manifest["splits"][split]["shards"]]
    parts = [np.fromfile(f, dtype=corpus.dtype, offset=HEADER_BYTES) for f in files]
    return np.concatenate(parts) if parts else np.empty(0, corpus.dtype)


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_matches_the_tokenizer(tmp_path, tokenizer_file, tok, workers):
    texts = docs(60)
    records = [{"text": t} for t in texts[:40]] + [{"prompt": t[:50], "response": t[50:]} for t in texts[40:]]
    src = write_jsonl(tmp_path / "a.jsonl", records)
    rendered = texts[:40] + [chat_text(t[:50], t[50:]) for t in texts[40:]]
    corpus = prepare_corpus(
        [src], tokenizer_file, tmp_path / "out", workers=workers, val_fraction=0.2, shard_tokens=700, progress=False
    )
    want = expected_tokens(rendered, tok, 0.2)
    assert want["val"] and want["train"]
    for split in ("train", "val"):
        arr = corpus.split(split)
        got = arr.read(0, arr.n_tokens)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, np.array(want[split]))
        assert arr.n_documents == want[split].count(tok.bos_id)
    assert len(corpus.manifest["splits"]["train"]["shards"]) > 3  # shard boundaries were crossed
    m = corpus.manifest
    assert m["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["sources"][0]["documents"] == 60
    assert corpus.tokenizer_sha256 == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    assert corpus.vocab_size == tok.vocab_size
    corpus.verify()


def test_read_across_shard_boundaries(tmp_path, tokenizer_file):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(50)])
    corpus = prepare_corpus(
        [src], tokenizer_file, tmp_path / "out", workers=1, val_fraction=0.0, shard_tokens=300, progress=False
    )
    arr = corpus.split("train")
    whole = raw_shard_tokens(corpus, "train")
    assert arr.n_tokens == len(whole)
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, arr.n_tokens))
        length = int(rng.integers(0, min(1500, arr.n_tokens - start) + 1))
        np.testing.assert_array_equal(arr.read(start, length), whole[start : start + length])
    with pytest.raises(IndexError):
        arr.read(arr.n_tokens - 3, 4)
    assert corpus.split("val").n_tokens == 0


def test_dtype_follows_the_vocabulary(tmp_path, tokenizer_file, tok):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    with pytest.raises(ShardError):
        dtype_for_vocab(2**32 + 1)
    big = Tokenizer.load(tokenizer_file)
    n_added = 65600 - big.vocab_size
    big.hf.add_tokens([f"<x{i}>" for i in range(n_added)])
    assert big.vocab_size == 65600
    big_file = tmp_path / "big.json"
    save_tokenizer_file(big, big_file)
    texts = ["plain text here", f"with the highest token <x{n_added - 1}> inside <x1>"]
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    corpus = prepare_corpus([src], big_file, tmp_path / "out", workers=1, val_fraction=0.0, progress=False)
    assert corpus.dtype == np.uint32 and corpus.manifest["bytes_per_token"] == 4
    got = corpus.split("train").read(0, corpus.split("train").n_tokens)
    want = [t for text in texts for t in (big.bos_id, *big.encode(text), big.eos_id)]
    assert max(want) == 65599
    np.testing.assert_array_equal(got, np.array(want, dtype=np.uint32))


def test_validation_split_follows_content(tmp_path, tokenizer_file):
    texts = docs(40)
    repeated = texts + texts[::3]  # duplicates within the file
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in repeated])
    # the same file twice: the second copy's documents must land where the first copy's did
    corpus = prepare_corpus([src, src], tokenizer_file, tmp_path / "out", workers=1, val_fraction=0.4, progress=False)
    tok = Tokenizer.load(tokenizer_file)
    sides = {}
    for split in ("train", "val"):
        arr = corpus.split(split)
        ids = arr.read(0, arr.n_tokens).tolist()
        bounds = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
        for a, b in zip(bounds, bounds[1:]):
            sides.setdefault(tok.decode(ids[a + 1 : b - 1]), set()).add(split)
    assert {len(s) for s in sides.values()} == {1}
    assert set(sides) == set(texts)
    val_docs = corpus.split("val").n_documents
    n_val_unique = sum(1 for t in texts if sides[t] == {"val"})
    assert 0 < n_val_unique < len(texts)
    assert val_docs == 2 * sum(1 + (i % 3 == 0) for i, t in enumerate(texts) if sides[t] == {"val"})


def test_killed_prepare_is_not_complete_and_rerun_continues(tmp_path, tokenizer_file, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(120)])
    clean = prepare_corpus(
        [src], tokenizer_file, tmp_path / "clean", workers=1, val_fraction=0.1, shard_tokens=500, progress=False
    )
    monkeypatch.setattr(shards, "BATCH_CHARS", 2000)
    monkeypatch.setattr(shards, "CHECKPOINT_SECONDS", 0.0)
    real, calls = shards._encode_batch, []

    def dies_on_the_sixth_batch(texts):
        calls.append(len(texts))
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated kill")
        return real(texts)

    monkeypatch.setattr(shards, "_encode_batch", dies_on_the_sixth_batch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([src], tokenizer_file, out, workers=1, val_fraction=0.1, shard_tokens=500, progress=False)
    assert not (out / "manifest.json").exists() and any(out.glob("train_*.bin"))
    with pytest.raises(ShardError, match="no manifest.json.*interrupted"):
        PreparedCorpus.open(out)
    monkeypatch.setattr(shards, "_encode_batch", real)
    log = []
    done = prepare_corpus(
        [src], tokenizer_file, out, workers=1, val_fraction=0.1, shard_tokens=500, progress=False, log=log.append
    )
    assert any("continuing" in line for line in log)
    assert done.fingerprint == clean.fingerprint
    run = done.manifest["last_run"]
    assert run["continued_after_documents"] > 0
    assert 0 < run["tokens_encoded"] < done.split("train").n_tokens + done.split("val").n_tokens
    assert not (out / "prepare-state.json").exists() and not list(out.glob(".*partial"))
    # a third run on the complete directory is a no-op
    again = prepare_corpus(
        [src], tokenizer_file, out, workers=1, val_fraction=0.1, shard_tokens=500, progress=False, log=log.append
    )
    assert again.fingerprint == clean.fingerprint and "nothing to do" in log[-1]


def test_interrupted_prepare_with_other_inputs_restarts(tmp_path, tokenizer_file, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs(30, seed=5)])
    monkeypatch.setattr(shards, "BATCH_CHARS", 2000)
    monkeypatch.setattr(shards, "CHECKPOINT_SECONDS", 0.0)
    real = shards._encode_batch
    calls = []

    def dies(texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(shards, "_encode_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([a], tokenizer_file, tmp_path / "out", workers=1, shard_tokens=300, progress=False)
    monkeypatch.setattr(shards, "_encode_batch", real)
    log = []
    corpus = prepare_corpus(
        [b], tokenizer_file, tmp_path / "out", workers=1, shard_tokens=300, progress=False, log=log.append
    )
    fresh = prepare_corpus([b], tokenizer_file, tmp_path / "fresh", workers=1, shard_tokens=300, progress=False)
    assert any("starting over" in line for line in log)
    assert corpus.fingerprint == fresh.fingerprint


def test_different_corpus_needs_force(tmp_path, tokenizer_file):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs(20, seed=3)])
    first = prepare_corpus([a], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(ShardError, match="different prepared corpus.*sources.*--force"):
        prepare_corpus([b], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    assert PreparedCorpus.open(tmp_path / "out").fingerprint == first.fingerprint  # untouched
    second = prepare_corpus([b], tokenizer_file, tmp_path / "out", workers=1, progress=False, force=True)
    assert second.fingerprint != first.fingerprint
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not part of a prepared corpus"):
        prepare_corpus([a], tokenizer_file, tmp_path / "other", workers=1, progress=False, force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_open_refuses_damaged_corpora(tmp_path, tokenizer_file):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(30)])
    out = tmp_path / "out"
    prepare_corpus([src], tokenizer_file, out, workers=1, shard_tokens=400, progress=False)
    shard = out / "train_000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(ShardError, match=r"train_000001\.bin is truncated"):
        PreparedCorpus.open(out)
    shard.write_bytes(b"\0" * 4 + data[4:])
    with pytest.raises(ShardError, match=r"train_000001\.bin is not a Felix token shard"):
        PreparedCorpus.open(out)
    shard.write_bytes(data)
    PreparedCorpus.open(out)
    shard.unlink()
    with pytest.raises(ShardError, match=r"train_000001\.bin .*missing"):
        PreparedCorpus.open(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json"):
        PreparedCorpus.open(out)
    with pytest.raises(ShardError, match="does not exist"):
        PreparedCorpus.open(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ sources
def test_every_source_kind_reads_the_same_documents(tmp_path):
    texts = docs(25) + ["line one\u2028still the same document", "x\r\nwindows line"]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(lines)
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "d" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(
        pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "d" / "e.parquet", row_group_size=7
    )
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "f.txt").write_text("a whole file\n\nis one document\n", encoding="utf-8")
    (tmp_path / "d" / "ignored.csv").write_text("x,y\n")
    files = expand_sources([tmp_path / "d"])
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "e.parquet", "f.txt"]
    for f in files[:4]:
        assert list(SourceReader(f)) == texts, f
    assert list(SourceReader(files[4])) == ["a whole file\n\nis one document\n"]
    assert expand_sources([str(tmp_path / "d" / "*.jsonl*")]) == files[:3]
    assert expand_sources([str(tmp_path / "**" / "*.txt")]) == [files[4]]
    pq.write_table(pa.table({"body": texts}), tmp_path / "g.parquet")
    assert list(SourceReader(tmp_path / "g.parquet", text_field="body")) == texts
    with pytest.raises(DataError, match=r"g\.parquet: no column 'text' \(columns: body\)"):
        list(SourceReader(tmp_path / "g.parquet"))


def test_source_errors_name_the_file(tmp_path):
    pq.write_table(pa.table({"text": docs(50)}), tmp_path / "ok.parquet")
    raw = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet"):
        list(SourceReader(tmp_path / "cut.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(DataError, match=r"junk\.parquet"):
        list(SourceReader(tmp_path / "junk.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n{"txt": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"(?s)bad\.jsonl: 3 of 4 .*bad\.jsonl:2: not valid JSON"):
        list(SourceReader(tmp_path / "bad.jsonl"))
    (tmp_path / "some.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    reader = SourceReader(tmp_path / "some.jsonl")
    assert list(reader) == ["a", "b"] and reader.stats.problems == [
        f"{tmp_path / 'some.jsonl'}:3: not valid JSON (Expecting value)"
    ]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable documents"):
        list(SourceReader(tmp_path / "empty.jsonl"))
    packed = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs(50)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz"):
        list(SourceReader(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8"):
        list(SourceReader(tmp_path / "latin.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        expand_sources([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="matches no"):
        expand_sources([str(tmp_path / "*.nothing")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no"):
        expand_sources([tmp_path / "empty_dir"])


def test_failed_prepare_leaves_no_manifest(tmp_path, tokenizer_file):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(20)])
    (tmp_path / "b.jsonl").write_text("nope\n" * 10 + '{"text": "x"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: 10 of 11"):
        prepare_corpus([good, tmp_path / "b.jsonl"], tokenizer_file, tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ShardError):
        PreparedCorpus.open(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_prepare_and_errors(tmp_path, tokenizer_file, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(20)])
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "prepare",
                str(src),
                "--tokenizer",
                str(tokenizer_file),
                "--out",
                str(out),
                "--workers",
                "1",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    corpus = PreparedCorpus.open(out)
    assert f"{corpus.split('train').n_tokens:,} tokens" in printed
    total = corpus.split("train").n_tokens + corpus.split("val").n_tokens
    assert f"encoded {total:,} tokens" in printed and corpus.manifest["last_run"]["tokens_encoded"] == total
    (tmp_path / "bad.jsonl").write_text("x\ny\n")
    for argv, message in [
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl: 2 of 2"),
        ([str(tmp_path / "nothing.jsonl")], "does not exist"),
        ([str(src), "--val-fraction", "1.5"], "val_fraction"),
    ]:
        assert (
            main(
                [
                    "data",
                    "prepare",
                    *argv,
                    "--tokenizer",
                    str(tokenizer_file),
                    "--out",
                    str(tmp_path / "o2"),
                    "--workers",
                    "1",
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err
    other = tmp_path / "b.jsonl"
    shutil.copy(src, other)
    assert (
        main(["data", "prepare", str(other), "--tokenizer", str(tokenizer_file), "--out", str(out), "--workers", "1"])
        == 2
    )
    assert "--force" in capsys.readouterr().err
    assert (
        main(["data", "prepare", str(src), "--tokenizer", str(tmp_path / "none.json"), "--out", str(tmp_path / "o3")])
        == 2
    )
    assert "no tokenizer" in capsys.readouterr().err


def test_token_id_outside_the_vocabulary_is_refused(tmp_path, tokenizer_file, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(10)])
    # a tokenizer whose stated vocabulary is smaller than the ids it produces (an inconsistent file)
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 270))
    with pytest.raises(ShardError, match=r"token id \d+ >= the vocabulary size 270"):
        prepare_corpus([src], tokenizer_file, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_two_prepares_never_write_one_directory(tmp_path, tokenizer_file):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(10)])
    out = tmp_path / "out"
    out.mkdir()
    with shards._exclusive(out):  # as a running prepare holds it
        with pytest.raises(ShardError, match="another `felix data prepare` is writing"):
            prepare_corpus([src], tokenizer_file, out, workers=1, progress=False)
    prepare_corpus([src], tokenizer_file, out, workers=1, progress=False)


def test_parallel_prepare_ends_under_a_parents_sigterm_handler(tmp_path, tokenizer_file):
    """Pool workers are forked: they inherit the caller's SIGTERM handler (a training loop's flag-setter, a server's).
    When a prepare fails midway, Pool.terminate must still end workers blocked on the task queue's lock; with an
    inherited do-nothing handler it waited for them forever (seen within 5 tries: a suite run hung here). A child
    process with a hard timeout runs 5 failing prepares, so a hang fails the test instead of the suite."""
    import subprocess
    import sys

    good = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(20)])
    (tmp_path / "b.jsonl").write_text("nope\n" * 10 + '{"text": "x"}\n')
    script = (
        "import signal\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "from felix.data.corpus import DataError\n"
        "from felix.data.shards import prepare_corpus\n"
        "for i in range(5):\n"
        "    try:\n"
        f"        prepare_corpus([{str(good)!r}, {str(tmp_path / 'b.jsonl')!r}], {str(tokenizer_file)!r},"
        f" {str(tmp_path)!r} + f'/out{{i}}', workers=2, progress=False, log=lambda m: None)\n"
        "    except DataError:\n"
        "        print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused"] * 5
