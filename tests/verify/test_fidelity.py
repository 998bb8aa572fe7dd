"""Fidelity harness: every metric on hand-built logits, probes, whitelist, compliance, gate, the simulated path
and the CLI on a tiny random-init checkpoint, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from felix.tasks import records as task_records
from felix.model import chat
from felix.verify import fidelity as F
from felix.ship import llamacpp
from felix.model import felix_lm as M
from felix.model.tokenizer import train_tokenizer


# ------------------------------------------------------------------------------------------ metrics
def test_margins_known_values_and_ties():
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0],  # target 0: 3 - 2 = 1
            [3.0, 1.0, 2.0],  # target 2: 2 - 3 = -1
            [1.0, 5.0, 5.0],  # target 1 ties with 2: margin 0 (undecided)
            [0.0, -4.0, 0.5],
        ]
    )  # target 1: -4 - 0.5 = -4.5
    got = F.margins(logits, torch.tensor([0, 2, 1, 1]))
    assert got.tolist() == [1.0, -1.0, 0.0, -4.5]
    assert got.dtype == torch.float64


def test_margin_random_matches_sorting(gen):
    z = torch.randn(50, 37, generator=gen)
    t = torch.randint(0, 37, (50,), generator=gen)
    want = [float(z[i, t[i]]) - max(float(v) for j, v in enumerate(z[i]) if j != t[i]) for i in range(50)]
    assert F.margins(z, t).tolist() == pytest.approx(want, abs=1e-6)


def test_known_flips_survival_and_margin_change():
    # positions: 0 kept (1 -> 0.5), 1 lost (1 -> -1), 2 gained (-1 -> 1), 3 tie -> lost? (0 -> -1: stays wrong),
    # 4 lost to a tie (2 -> 0), 5 not whitelisted and lost (ignored by the margin stats)
    ref = torch.tensor([[2.0, 1.0], [2.0, 1.0], [1.0, 2.0], [1.0, 1.0], [3.0, 1.0], [2.0, 1.0]])
    quant = torch.tensor([[1.5, 1.0], [0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    targets = torch.zeros(6, dtype=torch.long)
    wl = torch.tensor([True, False])
    stats = F.compare_logits(ref, quant, targets, wl)
    assert stats.whitelisted.tolist() == [True] * 6  # target 0 is whitelisted everywhere
    wl_pos = torch.tensor([True, True, True, True, True, False])
    stats.whitelisted = wl_pos
    assert stats.flipped.tolist() == [False, True, True, False, True, True]
    assert stats.lost.tolist() == [False, True, False, False, True, True]
    s = F.summarize(stats)
    m = s["margin"]
    assert s["whitelisted_positions"] == 5
    assert m["reference_correct"] == 3 and m["survived"] == 1 and m["survival"] == pytest.approx(1 / 3)
    assert (m["flips"], m["lost"], m["gained"]) == (3, 2, 1)
    assert m["change_mean"] == pytest.approx(((0.5 - 1) + (-1 - 1) + (1 + 1) + (-1 - 0) + (0 - 2)) / 5)
    assert m["change_min"] == pytest.approx(-2.0)
    # every position counts for top-1 agreement: 0 (same argmax), 1 (differs), 2 (differs), 3 (argmax of a tie is
    # the first index: 0 vs 1 differs), 4 (tie -> index 0: same), 5 (differs)
    assert s["top1_agreement"] == pytest.approx(2 / 6)


def test_margin_change_quantiles_and_minority_option():
    from felix.core.quail import NOISE_QUANTILES

    # 3 whitelisted tokens (0, 1, 2) + one that is not (3). Position 0: expected 0, runner-up 1 (whitelisted), p_ref(1)
    # = 1/(1+e^3+e^-9) ~ 0.047, quantized: runner-up logit +1 -> log-ratio ~ +1 - log(new norm / old norm).
    ref = torch.tensor([[3.0, 0.0, -9.0, -9.0], [3.0, -9.0, -9.0, 0.0], [0.0, 3.0, -9.0, -9.0]], dtype=torch.float64)
    quant = ref.clone()
    quant[0, 1] = 1.0
    quant[1, 3] = 1.0
    stats = F.compare_logits(ref, quant, torch.tensor([0, 0, 0]), torch.tensor([True, True, True, False]))
    assert stats.runner_up.tolist() == [1, 3, 1] and stats.runner_up_whitelisted.tolist() == [True, False, True]
    s = F.summarize(stats)
    assert set(s["margin"]["change_quantiles"]) == {f"{q:g}" for q in NOISE_QUANTILES}
    assert s["margin"]["change_quantiles"]["0.5"] == pytest.approx(-1.0)  # changes (-1, -1, 0)
    # only position 0 counts: position 1's runner-up is not whitelisted, position 2 is decided wrongly
    lr = float(torch.log_softmax(quant[0], -1)[1] - torch.log_softmax(ref[0], -1)[1])
    b = s["minority"]["0.01-0.1"]
    assert b["count"] == 1 and b["log_ratio_mean"] == pytest.approx(lr) and lr > 0.9
    assert b["p_ref_median"] == pytest.approx(float(torch.softmax(ref[0], -1)[1]))
    assert s["minority"]["0-0.01"]["count"] == 0 and s["minority"]["0.1-0.5"]["count"] == 0


def test_hedged_probe_set():
    probes = F.probe_set("hedged", 16)
    assert len(probes) == 16 and len({p.name for p in probes}) == 16
    assert [p.name for p in probes[:3]] == ["hedged-unmistakably-0", "hedged-unmistakably-1", "hedged-clearly-0"]
    p_true = dict(task_records.HEDGES)
    for p in probes:
        body = json.loads(p.expected.removesuffix(chat.END))
        assert body["has_principle"] == (p_true[p.name.split("-")[1]] > 0.5)
        assert F.check_compliance(json.dumps(body), p.schema)["compliant"]
    with pytest.raises(F.FidelityError, match="unknown probe set"):
        F.probe_set("nope", 4)


def test_weighed_probe_set():
    probes = F.probe_set("weighed", 40)
    assert len(probes) == 40 and len({p.prompt for p in probes}) == 40
    for p in probes:
        qualifiers = p.name.split("-")[1].split(".")
        body = json.loads(p.expected.removesuffix(chat.END))
        assert body["has_principle"] == (task_records.weighed_evidence(qualifiers) > 0)
        assert "Reviewers: " + "; ".join(qualifiers) + "." in p.prompt
        assert F.check_compliance(json.dumps(body), p.schema)["compliant"]
    with pytest.raises(F.FidelityError, match="weighed probes"):
        F.probe_set("weighed", 10_000)


def test_kl_identical_is_zero_and_known_value(gen):
    z = torch.randn(20, 64, generator=gen) * 3
    assert F.kl_divergence(z, z).abs().max() == 0.0
    assert F.kl_divergence(z, z + 7.0).abs().max() < 1e-12  # softmax is shift-invariant
    s = F.summarize(F.compare_logits(z, z.clone(), torch.zeros(20, dtype=torch.long), torch.ones(64, dtype=torch.bool)))
    assert s["kl"] == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    assert s["top1_agreement"] == 1.0 and s["margin"]["flips"] == 0 and s["delta_p"]["rms"] == 0.0
    # two tokens: P = (0.5, 0.5), Q = softmax(log 3, 0) = (0.75, 0.25): KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    kl = F.kl_divergence(
        torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    )
    assert float(kl) == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), rel=1e-12)
    q = z + torch.randn(20, 64, generator=gen)
    assert (F.kl_divergence(z, q) > 0).all()


def test_delta_p_of_expected_token():
    ref = torch.tensor([[0.0, 0.0]])  # p(target 0) = 0.5
    quant = torch.tensor([[math.log(3.0), 0.0]])  # p(target 0) = 0.75
    stats = F.compare_logits(ref, quant, torch.tensor([0]), torch.tensor([True, True]))
    assert float(stats.delta_p) == pytest.approx(0.25)


@pytest.mark.parametrize("case", ["shape", "nan", "target_range", "one_d", "int_logits", "vocab1", "mask"])
def test_metric_bad_inputs(case):
    z = torch.randn(4, 10)
    t = torch.tensor([1, 2, 3, 4])
    wl = torch.ones(10, dtype=torch.bool)
    args = {
        "shape": (z, torch.randn(4, 11), t, wl),
        "nan": (z, z.clone().fill_(float("nan")), t, wl),
        "target_range": (z, z, torch.tensor([1, 2, 3, 10]), wl),
        "one_d": (z[0], z[0], t, wl),
        "int_logits": (z.long(), z.long(), t, wl),
        "vocab1": (z[:, :1], z[:, :1], t * 0, wl),
        "mask": (z, z, t, torch.ones(10)),
    }[case]
    with pytest.raises(F.FidelityError):
        F.compare_logits(*args)


# --------------------------------------------------------------------------------- windows/scoring
@pytest.mark.parametrize("length,n_ctx", [(5, 8), (8, 8), (9, 8), (40, 8), (33, 16), (100, 7)])
def test_windows_score_every_target_once_with_context(length, n_ctx):
    wins = F.windows(length, n_ctx)
    scored = {}
    prev_end = 1
    for start, end in wins:
        assert 0 <= start < end <= length and end - start <= n_ctx
        for t in range(max(prev_end, start + 1), end):
            scored[t] = t - start
        prev_end = max(prev_end, end)
    assert sorted(scored) == list(range(1, length))
    assert all(ctx >= min(t, n_ctx // 2) for t, ctx in scored.items())


@pytest.fixture(scope="module")
def tok():
    texts = [chat.chat_text(r["prompt"], r["response"]) for r in task_records.structured_records(120, 5)]
    return train_tokenizer(texts, 400)


def tiny_model(tok, max_seq_len=128, seed=0):
    torch.manual_seed(seed)
    return M.FelixLM(M.preset("tiny", vocab_size=tok.vocab_size, n_layer=2, max_seq_len=max_seq_len))


def test_score_probes_windowed_matches_direct_forward(tok):
    model = tiny_model(tok, max_seq_len=24)
    wl = torch.zeros(tok.vocab_size, dtype=torch.bool)
    enc = F.encode_probes(F.builtin_probes(2), tok, wl)
    assert len(enc[0].ids) > 24  # really windowed
    got = F.score_probes(F.TorchSource(model), enc)
    assert got.shape == (sum(len(e.targets) for e in enc), tok.vocab_size)
    # each row equals the model's logits over the window the scheme picks for it
    i = 0
    for e in enc:
        for t in range(e.n_prompt, len(e.ids)):
            start = next(s for s, end in F.windows(len(e.ids), 24) if end > t)  # the first window reaching t
            with torch.no_grad():
                want = model(torch.tensor([e.ids[start:t]]))[0, -1]
            torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
            i += 1
            if i > 60:
                return


# ------------------------------------------------------------------------------------------ probes
def test_builtin_probes_cover_every_task_and_the_refusal_path():
    probes = F.builtin_probes(8)
    assert len(probes) == 8 and len({p.name for p in probes}) == 8
    kinds = [p.name.rsplit("-", 1)[0] for p in probes]
    assert all(kinds.count(k) == 2 for k in ("encoding", "episode", "principle-true", "principle-refusal"))
    for p in probes:
        assert p.prompt.endswith(chat.ASSISTANT + "\n") and p.expected.endswith(chat.END)
        body = json.loads(p.expected.removesuffix(chat.END))
        assert F.check_compliance(json.dumps(body), p.schema)["compliant"], p.name
        if p.name.startswith("principle-refusal"):
            assert body["has_principle"] is False
    with pytest.raises(F.FidelityError):
        F.builtin_probes(0)


def test_probe_file_malformed_lines_reported_with_line_numbers(tmp_path):
    path = tmp_path / "probes.jsonl"
    lines = [
        json.dumps({"prompt": "a", "expected": '{"x": 1}'}),
        "{not json",
        "",
        json.dumps({"prompt": "b"}),
        json.dumps({"prompt": "c", "expected": "d", "schema": {"required": {"x": "int"}}}),
        json.dumps(["prompt", "expected"]),
        json.dumps({"prompt": "e", "expected": "f", "name": "ok"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(F.FidelityError) as e:
        F.load_probes(path)
    msg = str(e.value)
    for n in (2, 4, 5, 6):
        assert f"probes.jsonl:{n}:" in msg
    for n in (1, 3, 7):
        assert f"probes.jsonl:{n}:" not in msg
    assert "4 malformed" in msg
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join([lines[0], lines[6]]) + "\n")
    probes = F.load_probes(good)
    assert [p.name for p in probes] == ["line-1", "ok"]
    assert probes[0].schema == {"required": {"x": "number"}, "enums": {}} and probes[1].schema is None
    with pytest.raises(F.FidelityError, match="does not exist"):
        F.load_probes(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(F.FidelityError, match="no probes"):
        F.load_probes(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------------- whitelist
def test_whitelist_reports_what_the_tokenizer_cannot_produce(tok):
    wl = F.build_probe_whitelist(
        tok, tok.vocab_size, strings=["confidence", ""], tokens=["{", "has_principle_that_is_not_one_token"]
    )
    assert wl.mask[tok.encode("{")[0]] and wl.mask.dtype == torch.bool
    for i in tok.encode(" confidence"):
        assert wl.mask[i]
    assert any("has_principle_that_is_not_one_token" in p and "not one token" in p for p in wl.problems)
    assert any("empty" in p for p in wl.problems)
    for i, text in ((int(s.split()[0]), s) for s in wl.unreachable):  # reported ones really do not round-trip
        assert tok.encode(tok.decode([i])) != [i], text
    specials = [tok.token_id(t) for t in ("<|bos|>", "<|end|>")]
    assert not wl.mask[specials].any()


# --------------------------------------------------------------------------------------- compliance
def test_check_compliance_each_failure_kind():
    schema = F.builtin_schemas()["encoding"]
    good = {
        "gist": "g",
        "summary": "s",
        "concepts": ["a"],
        "structured_concepts": {"people": [], "systems": [], "actions": [], "kind": "lesson"},
        "significance": "x",
        "salience": 0.5,
        "emotional_tone": "tense",
    }
    assert F.check_compliance(json.dumps(good), schema)["compliant"]
    r = F.check_compliance('{"gist": "g", "summary": ', schema)
    assert not r["valid_json"] and not r["compliant"] and "not valid JSON" in r["problems"][0]
    assert not F.check_compliance("[1, 2]", schema)["valid_json"]
    missing = {k: v for k, v in good.items() if k != "salience"}
    r = F.check_compliance(json.dumps(missing), schema)
    assert r["valid_json"] and not r["required_fields"] and not r["compliant"]
    r = F.check_compliance(json.dumps({**good, "salience": "high"}), schema)
    assert r["required_fields"] and not r["field_types"] and r["enum_values"]
    r = F.check_compliance(json.dumps({**good, "salience": True}), schema)  # a bool is not a number
    assert not r["field_types"]
    r = F.check_compliance(
        json.dumps({**good, "structured_concepts": {**good["structured_concepts"], "kind": "rant"}}), schema
    )
    assert r["field_types"] and not r["enum_values"] and "rant" in r["problems"][0]


def test_gate_thresholds():
    report = {
        "results": {
            "simulated": {
                "summary": {
                    "margin": {"survival": 0.9, "flips": 3},
                    "kl": {"mean": 0.01, "p99": 0.2},
                    "top1_agreement": 0.95,
                }
            }
        }
    }
    assert F.Gate().check(report) == []
    assert (
        F.Gate(min_margin_survival=0.9, max_flips=3, max_kl_mean=0.01, max_kl_p99=0.2, min_top1_agreement=0.95).check(
            report
        )
        == []
    )
    fails = F.Gate(
        min_margin_survival=0.95, max_flips=2, max_kl_mean=0.001, max_kl_p99=0.1, min_top1_agreement=0.99
    ).check(report)
    assert len(fails) == 5 and all(f.startswith("simulated:") for f in fails)
    report["results"]["simulated"]["summary"]["margin"]["survival"] = float("nan")
    assert "undefined" in F.Gate(min_margin_survival=0.5).check(report)[0]


# -------------------------------------------------------------------------------- end to end (tiny)
@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "ck"
    M.save_checkpoint(path, tiny_model(tok), tok)
    return path


def test_simulated_path_f32_is_exact_and_q4_0_is_close(checkpoint):
    opts = dict(n_probes=2, max_new_tokens=4, sensitivity=False)
    exact = F.run_fidelity(checkpoint, F.FidelityOptions(quant="f32", **opts))
    s = exact["results"]["simulated"]["summary"]
    assert s["kl"]["max"] == 0.0 and s["top1_agreement"] == 1.0 and s["margin"]["flips"] == 0
    assert s["margin"]["change_abs_max"] == 0.0
    c = exact["results"]["simulated"]["compliance"]
    assert c["reference"]["probes"] == 2 and c["reference"] == c["quantized"]
    q = F.run_fidelity(checkpoint, F.FidelityOptions(quant="q4_0", **opts, compliance=False))
    s = q["results"]["simulated"]["summary"]
    assert 0 < s["kl"]["mean"] < 0.05 and s["margin"]["change_abs_max"] > 0
    assert s["whitelisted_positions"] > 10 and "compliance" not in q["results"]["simulated"]
    types = {t["name"]: t["type"] for t in q["tensor_types"]}
    assert types["blk.0.attn_q.weight"] == "q4_0" and types["token_embd.weight"] == "q8_0"
    assert types["blk.0.attn_norm.weight"] == "f32"
    assert q["schema"] == F.SCHEMA_NAME and q["schema_version"] == F.SCHEMA_VERSION


def test_sensitivity_ranks_only_quantized_tensors(checkpoint, tok):
    model, _ = F.load_for_fidelity(checkpoint)
    enc = F.encode_probes(F.builtin_probes(1), tok, F.build_probe_whitelist(tok, tok.vocab_size).mask)
    ref = F.score_probes(F.TorchSource(model), enc)
    rows = F.sensitivity(model, enc, "q4_0", None, F.build_probe_whitelist(tok, tok.vocab_size).mask, ref)
    names = [r["tensor"] for r in rows]
    assert "blk.0.attn_norm.weight" not in names and "blk.1.ffn_down.weight" in names
    assert len(names) == 2 * 7 + 1  # 7 projections per layer + the Q8_0 embedding
    costs = [r["margin_cost"] for r in rows]
    assert costs == sorted(costs, reverse=True) and any(c != 0 for c in costs)


def test_checkpoint_tokenizer_mismatch(checkpoint, tmp_path):
    other = train_tokenizer(["some other text " * 50], 300)
    other.save(tmp_path)
    with pytest.raises(F.FidelityError, match="checkpoint/tokenizer mismatch"):
        F.load_for_fidelity(checkpoint, tmp_path / "tokenizer.json")


def test_bad_options(checkpoint, monkeypatch):
    with pytest.raises(F.FidelityError, match="unknown sim_activations"):
        F.run_fidelity(checkpoint, F.FidelityOptions(quant="q4_0", sim_activations="fp8"))
    monkeypatch.setattr(llamacpp, "available", lambda runtime="stock": (False, "llama-cpp-python is not installed"))
    with pytest.raises(F.FidelityError, match="runtime path runs llama.cpp: llama-cpp-python is not installed"):
        F.run_fidelity(checkpoint, F.FidelityOptions(quant="q4_0", paths=("runtime",)))
    with pytest.raises(F.FidelityError, match="unknown path"):
        F.run_fidelity(checkpoint, F.FidelityOptions(quant="rq4", paths=("gpu",)))
    with pytest.raises(ValueError, match="unknown quantization type"):
        F.run_fidelity(checkpoint, F.FidelityOptions(quant="q3_k"))


def test_cli_writes_reports_and_gates(checkpoint, tmp_path, capsys):
    from felix.cli.main import main

    out = tmp_path / "out"
    rc = main(
        [
            "fidelity",
            str(checkpoint),
            "--quant",
            "rq4",
            "--n-probes",
            "2",
            "--max-new-tokens",
            "3",
            "--no-sensitivity",
            "--out-dir",
            str(out),
            "--max-kl-mean",
            "1e-9",
        ]
    )
    assert rc == 1  # rq4 moves the logits: KL above 1e-9
    assert "GATE FAILED" in capsys.readouterr().err
    report = json.loads((out / "fidelity-rq4.json").read_text())
    assert report["gate"]["passed"] is False and report["quant"] == "rq4"
    assert (out / "fidelity-rq4.md").read_text().startswith("# Fidelity report")
    assert (out / "fidelity-rq4-simulated-margins.png").stat().st_size > 1000
    rc = main(
        [
            "fidelity",
            str(checkpoint),
            "--quant",
            "f32",
            "--n-probes",
            "1",
            "--no-compliance",
            "--no-sensitivity",
            "--out-dir",
            str(out),
            "--max-kl-mean",
            "1e-9",
            "--min-top1-agreement",
            "1",
        ]
    )
    assert rc == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    rc = main(["fidelity", str(checkpoint), "--probes", str(bad), "--out-dir", str(out)])
    assert rc == 2 and "bad.jsonl:1:" in capsys.readouterr().err


def test_simulation_quantizes_merged_splices_as_the_exported_file_holds_them(tok, tmp_path):
    """A plain checkpoint ships its splices merged (--splice merge): the file holds quantized(W + gate B A). The
    simulated deployment must quantize the same merged weight, not W alone with the splice added in f32 after.
    Truth: the exported q4_0 file, decoded tensor by tensor (felix.ship.export.model_from_gguf)."""
    from felix.ship.export import export_gguf, model_from_gguf
    from felix.verify.fidelity.harness import deployed_state, quantized_state

    torch.manual_seed(0)
    model = M.FelixLM(
        M.preset(
            "tiny",
            vocab_size=tok.vocab_size,
            n_layer=2,
            max_seq_len=32,
            splice_layers=[1],
            splice_projections=["attn_q", "ffn_down"],
        )
    )
    spliced = [(i, p) for i, blk in enumerate(model.blk) for p in blk.splice]
    assert spliced
    with torch.no_grad():
        for i, p in spliced:
            model.blk[i].splice[p].b.normal_(0, 0.05)  # live splices
    ck = M.save_checkpoint(tmp_path / "ck", model.eval(), tok)
    export_gguf(ck, tmp_path / "m.gguf", quant="q4_0")
    decoded = model_from_gguf(tmp_path / "m.gguf").state_dict()
    qstate, _ = quantized_state(deployed_state(model), "q4_0")
    for i, p in spliced:
        name = f"blk.{i}.{p}.weight"
        assert torch.equal(qstate[name], decoded[name]), name
        assert not torch.equal(qstate[name], quantized_state(model.state_dict(), "q4_0")[0][name])  # W alone differs
        assert not qstate[f"blk.{i}.splice.{p}.b"].any()  # the splice is inside the weight now
    # and the simulated model computes what the file computes (exact activations): the decoded model's logits
    x = torch.randint(0, tok.vocab_size, (1, 16))
    sim = F.simulated_model(model, qstate, None, "exact")
    with torch.no_grad():
        torch.testing.assert_close(sim(x), model_from_gguf(tmp_path / "m.gguf")(x), rtol=1e-5, atol=1e-5)
