"""`felix tokenizer train`: a bounded, streamed sample (the caps stop the reading), Felix's special tokens at ids
0-6, the sample reported, the output written atomically and never over an existing file without --force."""

from __future__ import annotations

import gzip
import json

import pytest

from felix.cli.main import main
from felix.data.corpus import DataError
from felix.core.files import file_sha256
from felix.testing.corpus import text_documents, write_text_corpus
from felix.model.tokenizer import SPECIAL_TOKENS, Tokenizer
from felix.data.tokenizer_training import TokenizerSample, bounded_sample, train_tokenizer_from_sources


def test_sample_stops_at_the_character_cap(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(50)]
    good = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    # a tail of malformed lines, refused if the reader ever reached the file's end
    (tmp_path / "a.jsonl").write_text(good + "not json\n" * 500)
    # a second file that would fail as soon as it was opened
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(good.encode())[:30])
    with pytest.raises(DataError, match=r"a\.jsonl: 500 of 550"):
        list(bounded_sample([tmp_path / "a.jsonl"], max_chars=10**9, doc_cap=10**6))
    sample = TokenizerSample(max_chars=1000, doc_cap=300)
    texts = list(
        bounded_sample([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], max_chars=1000, doc_cap=300, sample=sample)
    )
    assert sum(map(len, texts)) == 1000 and sample.chars == 1000 and sample.capped
    assert texts[0] == docs[0][:300] and max(map(len, texts)) == 300
    assert sample.documents == len(texts) == 4 and sample.truncated_documents == 4  # each ~380 chars
    assert [len(t) for t in texts] == [300, 300, 300, 100]  # the last one cut by the total cap
    assert sample.sources == [str(tmp_path / "a.jsonl")]


def test_specials_first_and_sample_reported(tmp_path):
    corpus = tmp_path / "c.jsonl"
    write_text_corpus(corpus, 300_000, seed=2)
    tok, sample = train_tokenizer_from_sources([corpus], vocab_size=600, max_chars=100_000, doc_cap=2_000)
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.vocab_size == 600
    assert sample.capped and sample.chars == 100_000 and "stopped at the --max-chars cap" in sample.describe()
    text = next(text_documents(9))
    assert tok.decode(tok.encode(text)) == text  # byte-level: everything round-trips


def test_cli_writes_atomically_and_refuses_to_overwrite(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    write_text_corpus(corpus, 120_000, seed=3)
    out = tmp_path / "tok.json"
    argv = ["tokenizer", "train", str(corpus), "--vocab-size", "500", "--out", str(out), "--max-chars", "5e4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "50,000 characters" in printed and "vocabulary 500" in printed
    tok = Tokenizer.load(out)
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    before = file_sha256(out)
    assert main(argv[:-2]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err and file_sha256(out) == before
    assert main(argv[:-2] + ["--force"]) == 0 and file_sha256(out) != before  # a bigger sample, another tokenizer
    assert {p.name for p in tmp_path.iterdir()} == {"c.jsonl", "tok.json"}  # no temporary file left
    (tmp_path / "empty.jsonl").write_text("\n")
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(tmp_path / "empty.jsonl"),
                "--vocab-size",
                "500",
                "--out",
                str(tmp_path / "t2.json"),
            ]
        )
        == 2
    )
    assert "no usable documents" in capsys.readouterr().err and not (tmp_path / "t2.json").exists()
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t3.json")]) == 2
    assert "too small" in capsys.readouterr().err
