"""Built-in corpus, structured records, user data files, validation split, token stream, tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch

from felix.data import corpus as data
from felix.tasks import records as task_records
from felix.model import chat
from felix.model.tokenizer import SPECIAL_TOKENS, Tokenizer, json_structure_whitelist, train_tokenizer


@pytest.fixture(scope="module")
def small_tokenizer():
    docs = data.builtin_prose()[:20] + [
        chat.chat_text(r["prompt"], r["response"]) for r in task_records.structured_records(200, seed=3)
    ]
    return train_tokenizer(docs, vocab_size=600)


def test_structured_records_have_the_task_suite_shapes(seed):
    records = task_records.structured_records(80, seed=seed)
    assert {r["task"] for r in records} == set(task_records.TASKS)
    seen_refusal = seen_principle = False
    for r in records:
        if r["task"] == "synthesis":
            n_sentences = len(re.findall(r"[.!?](?:\s|$)", r["response"]))
            assert 2 <= n_sentences <= 5, r["response"]
            with pytest.raises(json.JSONDecodeError):
                json.loads(r["response"])
            continue
        obj = json.loads(r["response"])
        if r["task"] == "encoding":
            assert {"gist", "summary", "concepts", "structured_concepts", "significance", "salience"} <= set(obj)
            assert isinstance(obj["concepts"], list) and obj["concepts"]
            assert isinstance(obj["structured_concepts"], dict) and 0 <= obj["salience"] <= 1
        elif r["task"] == "episode":
            assert set(obj) == {"title", "summary", "concepts", "salience"}
            assert isinstance(obj["concepts"], list) and 0 <= obj["salience"] <= 1
        else:
            assert set(obj) == {"has_principle", "title", "principle", "concepts", "confidence"}
            assert isinstance(obj["has_principle"], bool)
            if obj["has_principle"]:
                seen_principle = True
                assert obj["principle"] and obj["concepts"]
            else:
                seen_refusal = True
                assert obj["principle"] == "" and obj["concepts"] == []
    assert seen_refusal and seen_principle
    assert task_records.structured_records(10, seed=seed) == task_records.structured_records(10, seed=seed)
    assert task_records.structured_records(10, seed=seed) != task_records.structured_records(10, seed=seed + 1)


def test_builtin_corpus_is_offline_and_substantial():
    prose = data.builtin_prose()
    assert len(prose) > 50 and sum(map(len, prose)) > 300_000
    corpus = data.builtin_corpus(n_records=40)
    assert len(corpus) == len(prose) + 40 and chat.ASSISTANT in corpus[-1]


def test_split_is_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(200)]
    train, val = data.split_documents(docs, 0.1, seed=1)
    assert (train, val) == data.split_documents(docs, 0.1, seed=1)
    assert len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 200


def test_user_data_reports_malformed_lines_by_number(tmp_path):
    good = [json.dumps({"text": "hello world"}), json.dumps({"prompt": "p", "response": "r", "teacher": "t"})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good * 3 + ["{not json", json.dumps({"prompt": "only a prompt"})]) + "\n")
    loaded = data.load_user_data([path])
    assert len(loaded.documents) == 6 and len(loaded.records) == 3
    assert [s.split(": ")[0] for s in loaded.skipped] == [f"{path}:7", f"{path}:8"]
    assert "not valid JSON" in loaded.skipped[0] and "'prompt' and 'response'" in loaded.skipped[1]


def test_user_data_mostly_malformed_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"text": "ok"}), "oops", "[1, 2]", '{"text": 3}']))
    with pytest.raises(data.DataError, match=r"3 of 4 non-empty lines are malformed(.|\n)*bad.jsonl:2(.|\n)*:3"):
        data.load_user_data([path])
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_user_data([tmp_path / "nope.jsonl"])


def test_text_files_are_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    assert data.load_user_data([tmp_path / "a.txt"]).documents == ["plain text document\n"]


def test_token_stream_wraps_and_resumes_exactly(seed):
    stream = data.TokenStream(torch.arange(101), seq_len=10, seed=seed)
    assert stream.n_windows == 10
    for _ in range(3):
        stream.next_batch(4)
    assert stream.wraps == 1
    state = stream.state_dict()
    expected = [stream.next_batch(3) for _ in range(5)]
    resumed = data.TokenStream(torch.arange(101), seq_len=10, seed=seed)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch(3) for _ in range(5)]):
        assert torch.equal(x, rx) and torch.equal(y, ry) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(data.DataError, match="cannot resume"):
        data.TokenStream(torch.arange(201), seq_len=10, seed=seed).load_state_dict(state)
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.TokenStream(torch.arange(5), seq_len=10)


def test_tokenizer_round_trip_specials_and_whitelist(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert tok.vocab_size == 600
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = chat.chat_text("Encode: caf\u00e9 \u2603 {x}", '{"gist": "a", "concepts": []}')
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_id(chat.USER) in ids and tok.token_id(chat.END) in ids
    whitelist = json_structure_whitelist(tok)
    texts = {tok.decode([i]).strip() for i in whitelist}
    assert {"{", "}", "[", "]", ":", ",", '"'} <= texts
    literal_ids = {i for lit in ("true", "false", "null") for v in (lit, " " + lit) for i in tok.encode(v)}
    assert all(set(tok.decode([i])) & set('{}[]":,') or i in literal_ids for i in whitelist)
    assert not set(whitelist) & {tok.token_id(t) for t in SPECIAL_TOKENS}
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == ids and again.bos_id == tok.bos_id
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_paragraph_chunks_keep_paragraphs_whole():
    paras = [f"paragraph {i} " + "word " * (i * 37 % 300) for i in range(40)]
    text = "\n\n".join(paras)
    chunks = data.paragraph_chunks(text, max_chars=800)
    assert "\n\n".join(chunks) == text
    assert all(len(c) <= 800 or "\n\n" not in c for c in chunks) and len(chunks) > 5


# ------------------------------------------------------------------------------ the flip regime
def test_hedged_records_are_valid_seeded_and_follow_their_reliability():
    records = task_records.structured_records(4000, seed=11, tasks=(task_records.PRINCIPLE_HEDGED,))
    assert records == task_records.structured_records(4000, seed=11, tasks=(task_records.PRINCIPLE_HEDGED,))
    assert records[:50] != task_records.structured_records(50, seed=12, tasks=(task_records.PRINCIPLE_HEDGED,))
    p_true = dict(task_records.HEDGES)
    counts = {h: [0, 0] for h in p_true}
    for r in records:
        obj = json.loads(r["response"])
        assert list(obj) == ["has_principle", "title", "principle", "concepts", "confidence"]
        assert r["p_true"] == p_true[r["hedge"]] and f"are {r['hedge']} connected." in r["prompt"]
        assert r["prompt"].startswith("Abstract a principle")
        if obj["has_principle"]:
            assert obj["principle"] and obj["concepts"] and obj["title"]
        else:
            assert obj["principle"] == "" and obj["concepts"] == [] and obj["title"] == ""
        counts[r["hedge"]][obj["has_principle"]] += 1
    for h, (n_false, n_true) in counts.items():  # binomial: 5 standard deviations
        n = n_false + n_true
        assert abs(n_true / n - p_true[h]) < 5 * (p_true[h] * (1 - p_true[h]) / n) ** 0.5 + 1e-9, h
    assert task_records.PRINCIPLE_HEDGED not in task_records.TASKS  # opt-in: the default corpus is unchanged


def test_hedged_probe_records_expect_the_majority_answer():
    probes = task_records.hedged_probe_records(3)
    assert probes == task_records.hedged_probe_records(3) and probes != task_records.hedged_probe_records(3, seed=5)
    assert [r["hedge"] for r in probes] == [h for h, _ in task_records.HEDGES for _ in range(3)]
    for r in probes:
        assert json.loads(r["response"])["has_principle"] == (r["p_true"] > 0.5)
    assert task_records.hedge_bayes_margin(0.7) == pytest.approx(0.8473, abs=1e-4)
    assert task_records.hedge_bayes_margin(0.3) == task_records.hedge_bayes_margin(0.7)
    with pytest.raises(ValueError):
        task_records.hedged_probe_records(0)


def test_weighed_records_follow_the_summed_evidence():
    """Labels drawn with P(true) = sigmoid(sum of the reviewers' weights): checked per evidence bin (binomial, 5 sd)
    against the float64 logistic of the sum computed here from REVIEW_WEIGHTS."""
    import math

    records = task_records.structured_records(6000, seed=13, tasks=(task_records.PRINCIPLE_WEIGHED,))
    assert records == task_records.structured_records(6000, seed=13, tasks=(task_records.PRINCIPLE_WEIGHED,))
    weights = dict(task_records.REVIEW_WEIGHTS)
    bins = {}
    for r in records:
        obj = json.loads(r["response"])
        assert len(r["qualifiers"]) == task_records.N_REVIEWERS and r["prompt"].endswith(
            f"Reviewers: {'; '.join(r['qualifiers'])}."
        )
        ev = sum(weights[q] for q in r["qualifiers"])
        assert r["evidence"] == pytest.approx(ev, abs=1e-12)
        p = 1.0 / (1.0 + math.exp(-ev))
        b = bins.setdefault(round(p, 1), [0, 0.0, 0])
        b[0] += 1
        b[1] += p
        b[2] += obj["has_principle"]
        assert bool(obj["principle"]) == obj["has_principle"]
    for key, (n, p_sum, n_true) in bins.items():
        p_mean = p_sum / n  # expected count is the sum of the records' own probabilities
        assert abs(n_true - p_sum) <= 5 * (n * p_mean * (1 - p_mean)) ** 0.5 + 1, key
    assert task_records.PRINCIPLE_WEIGHED not in task_records.TASKS
    with pytest.raises(ValueError, match="unknown reviewer qualifier"):
        task_records.weighed_evidence(["clearly", "maybe"])


def test_weighed_probes_are_distinct_combinations_expecting_the_majority_answer():
    probes = task_records.weighed_probe_records(512)
    assert probes == task_records.weighed_probe_records(512) and probes[:5] != task_records.weighed_probe_records(
        5, seed=3
    )
    assert len({tuple(r["qualifiers"]) for r in probes}) == 512 == len({r["prompt"] for r in probes})
    for r in probes:
        assert json.loads(r["response"])["has_principle"] == (r["evidence"] > 0)
    sums = [r["evidence"] for r in probes]
    assert min(sums) == pytest.approx(-7.8) and max(sums) == pytest.approx(9.3)
    assert sum(abs(x) < 0.5 for x in sums) == 51  # the near ties the regime is built for (see felix.data.corpus)
    with pytest.raises(ValueError):
        task_records.weighed_probe_records(513)


def test_builtin_corpus_tasks_and_prose_switch():
    docs = data.builtin_corpus(n_records=12, seed=1, tasks=(task_records.PRINCIPLE_HEDGED,), prose=False)
    assert len(docs) == 12 and all("Reviewer note" in d for d in docs)
    with pytest.raises(ValueError, match="unknown structured task"):
        data.builtin_corpus(n_records=2, tasks=("nope",), prose=False)
