"""felix.train.distill (and the teacher data it trains on, felix.data.teachers): teacher data (formats, bad lines by
path:line), per-prompt selection (schema-valid first, swappable scorer), the agreement report, the student snapshot,
the DPO loss against a float64 textbook formula, sequence log-probabilities and the QUAIL term against full logits,
and tiny SODA runs of the one training loop: the reward margin rises, the run directory is locked, a resumed run
equals the uninterrupted one, and the metrics land in the loop's metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from felix.data import teachers
from felix.tasks import records as task_records
from felix.tasks import schema_check, word_f1
from felix.cli.main import main
from felix.model import chat
from felix.model.generate import greedy_responses
from felix.tasks.perturbations import BUILTIN_TEACHERS
from felix.train import distill, runs
from felix.train.loop import METRICS_FILE
from felix.model.felix_lm import FelixConfig, FelixLM, load_checkpoint, save_checkpoint
from felix.ops.reference.dpo import textbook_dpo
from felix.model.tokenizer import Tokenizer, json_structure_whitelist, train_tokenizer

COLOURS = ("red", "green", "blue", "amber", "violet", "grey")


def _principle(has: bool, title: str = "Pin versions", conf: float = 0.8) -> str:
    return json.dumps(
        {
            "has_principle": has,
            "title": title if has else "",
            "principle": f"Always {title.lower()}." if has else "",
            "concepts": ["deps"] if has else [],
            "confidence": conf,
        }
    )


# ------------------------------------------------------------------------------------ teacher data
def test_both_line_formats_group_by_prompt(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(
                    {"prompt": "p1", "task": "principle", "responses": {"a": _principle(True), "b": _principle(False)}}
                ),
                json.dumps({"prompt": "p1", "response": _principle(True, "Test early"), "teacher": "c"}),
                "",
                json.dumps({"prompt": "p2", "response": "two sentences. here.", "teacher": "a", "task": "synthesis"}),
                json.dumps({"prompt": "p1", "response": _principle(True), "teacher": "a"}),  # a repeat, identical: fine
            ]
        )
        + "\n"
    )
    groups = teachers.load_teacher_groups([path])
    assert [g.prompt for g in groups] == ["p1", "p2"]
    assert list(groups[0].responses) == ["a", "b", "c"] and groups[0].task == "principle"
    assert groups[0].sources["c"] == f"{path}:2" and groups[1].task == "synthesis"
    out = teachers.write_teacher_groups(groups, tmp_path / "round.jsonl")
    again = teachers.load_teacher_groups([out])
    assert [(g.prompt, g.task, g.responses) for g in again] == [(g.prompt, g.task, g.responses) for g in groups]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "p", "response": "r"}), "'responses'"),
        (json.dumps({"prompt": "", "response": "r", "teacher": "t"}), "non-empty string 'prompt'"),
        (json.dumps({"prompt": "p", "responses": {"t": ""}}), "map teacher names"),
        (json.dumps({"prompt": "p", "task": 3, "response": "r", "teacher": "t"}), "'task'"),
        (json.dumps({"prompt": "p1", "response": "other", "teacher": "a"}), "already gave a different response"),
        (json.dumps({"prompt": "p1", "task": "episode", "response": "x", "teacher": "z"}), "task 'episode'"),
    ],
)
def test_malformed_teacher_lines_are_named_by_path_and_line(tmp_path, line, reason):
    good = json.dumps({"prompt": "p1", "task": "principle", "response": "r", "teacher": "a"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(teachers.DistillError, match=rf"bad\.jsonl:3: .*{reason}"):
        teachers.load_teacher_groups([path])


def test_missing_and_empty_teacher_files(tmp_path):
    with pytest.raises(teachers.DistillError, match="does not exist"):
        teachers.load_teacher_groups([tmp_path / "nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(teachers.DistillError, match="no teacher records"):
        teachers.load_teacher_groups([tmp_path / "empty.jsonl"])


def test_builtin_teachers_are_deterministic_and_graded_by_design():
    a = teachers.builtin_teacher_groups(40, seed=3)
    b = teachers.builtin_teacher_groups(40, seed=3)
    assert [g.responses for g in a] == [g.responses for g in b]
    records = task_records.structured_records(40, seed=3)
    assert [g.responses["exact"] for g in a] == [r["response"] for r in records]
    valid = {t: sum(schema_check(g.task, g.responses[t])["compliant"] for g in a) for t in BUILTIN_TEACHERS}
    assert valid["exact"] == 40 and valid["noisy"] == 40 and 5 <= valid["sloppy"] <= 35  # sloppy breaks ~half
    assert sum(g.responses["noisy"] != g.responses["exact"] for g in a) >= 30


# --------------------------------------------------------------------------------------- selection
def _group():
    return teachers.TeacherGroup(
        "p",
        "principle",
        {
            "broken": '{"has_principle": true, "title": "Pin',  # invalid JSON
            "long": _principle(True, "Pin dependencies and upgrade them deliberately"),
            "short": _principle(True, "Pin versions"),
            "other": _principle(True, "Pin versions", conf=0.7),
        },
    )


def test_selection_prefers_schema_valid_then_the_scorer():
    g = _group()
    (s,) = teachers.select_responses([g], "consensus")
    assert s.valid and s.teacher in ("short", "other") and s.n_valid == 3 and s.validity["broken"] is False
    # consensus: the response closest to the others; "short" and "other" agree with each other most, tie -> first
    expected = max(
        ["long", "short", "other"], key=lambda t: (teachers.consensus_score(g, t), -list(g.responses).index(t))
    )
    assert s.teacher == expected == "short"
    (s2,) = teachers.select_responses([g], "shortest")
    assert s2.teacher == min(["long", "short", "other"], key=lambda t: len(g.responses[t]))
    # a swapped-in scorer that loves the broken answer still cannot pick it: valid responses come first
    (s3,) = teachers.select_responses([g], lambda grp, t: 100.0 if t == "broken" else (1.0 if t == "long" else 0.0))
    assert s3.teacher == "long"
    # with no valid response at all, the scorer picks among the invalid ones, flagged
    bad = teachers.TeacherGroup("q", "principle", {"x": "{", "y": "not json"})
    (s4,) = teachers.select_responses([bad], lambda grp, t: float(t == "y"))
    assert s4.teacher == "y" and not s4.valid and s4.n_valid == 0
    with pytest.raises(teachers.DistillError, match="unknown teacher scorer"):
        teachers.select_responses([g], "best")


def test_ties_go_to_the_teacher_listed_first():
    g = teachers.TeacherGroup("p", None, {"b": "same", "a": "same"})  # no task: nothing to check, all valid
    assert teachers.select_responses([g], lambda grp, t: 0.0)[0].teacher == "b"


# ------------------------------------------------------------------------------------- agreement
def test_agreement_report_numbers(tmp_path):
    groups = [
        teachers.TeacherGroup("p1", "principle", {"a": _principle(True), "b": _principle(True)}),  # identical
        teachers.TeacherGroup("p2", "principle", {"a": _principle(True), "b": _principle(False)}),  # decisions differ
        teachers.TeacherGroup("p3", "synthesis", {"a": "One two. Three four.", "b": "one two"}),  # b: 1 sentence
        teachers.TeacherGroup("p4", "synthesis", {"a": "Only a."}),  # b absent
    ]
    sel = teachers.select_responses(groups)
    rep = teachers.teacher_agreement(groups, sel)
    pair = rep["overall"]["pairs"]["a vs b"]
    assert pair["prompts"] == 3 and pair["exact"] == pytest.approx(1 / 3)
    f1 = [1.0, word_f1(_principle(True), _principle(False)), word_f1("One two. Three four.", "one two")]
    assert pair["word_f1"] == pytest.approx(sum(f1) / 3)
    assert pair["decisions"] == 2 and pair["decision_agreement"] == pytest.approx(0.5)
    assert pair["both_valid"] == pytest.approx(2 / 3)
    assert rep["overall"]["teachers"]["a"] == {"responses": 4, "valid": pytest.approx(3 / 4)}  # "Only a." is 1 sentence
    assert rep["overall"]["teachers"]["b"] == {"responses": 3, "valid": pytest.approx(2 / 3)}
    syn = rep["per_task"]["synthesis"]["pairs"]["a vs b"]
    assert syn["prompts"] == 1 and syn["decision_agreement"] is None
    assert sum(rep["selection"]["selected"].values()) == 4 and rep["selection"]["no_valid_response"] == 1
    files = teachers.write_agreement_report(rep, tmp_path)
    assert json.loads(files["json"].read_text())["overall"]["pairs"]["a vs b"]["prompts"] == 3
    md = files["markdown"].read_text()
    assert "| a vs b | all | 3 | 0.33 |" in md and "| a vs b | synthesis | 1 | 0.00 |" in md
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_dpo_loss_matches_the_textbook_formula_in_float64(seed, beta):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    out = distill.dpo_loss(pc, pr, rc, rr, beta)
    want, want_grad = textbook_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta)
    assert out.loss.dtype == torch.float64
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-12, abs=1e-14)
    out.loss.backward()
    assert pc.grad.tolist() == pytest.approx(want_grad, rel=1e-10, abs=1e-15)
    margin = beta * ((pc - rc) - (pr - rr)).detach()
    assert torch.allclose(out.margin, margin) and float(out.accuracy) == float((margin > 0).double().mean())
    assert torch.allclose(out.reward_chosen - out.reward_rejected, out.margin)
    # fp32 inputs: the same value within fp32 rounding of the log-ratios (|x| <= beta * 100, eps 2^-24 each)
    out32 = distill.dpo_loss(*(t.detach().float() for t in (pc, pr, rc, rr)), beta=beta)
    assert float(out32.loss) == pytest.approx(want, abs=4 * beta * 100 * 2**-24 + 1e-6)
    assert torch.autograd.gradcheck(
        lambda a: distill.dpo_loss(a, pr, rc, rr, beta).loss, (pc.detach().requires_grad_(),)
    )


def test_dpo_loss_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="one shape"):
        distill.dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        distill.dpo_loss(x, torch.tensor([0.0, float("nan"), 0.0]), x, x)
    with pytest.raises(ValueError, match="beta must be positive"):
        distill.dpo_loss(x, x, x, x, beta=0.0)


# ---------------------------------------------------------------------------- a tiny student + data
def _short_groups(n=24):
    groups = []
    for i in range(n):
        c = COLOURS[i % len(COLOURS)]
        groups.append(
            teachers.TeacherGroup(f"colour of item {i}?", None, {"good": f"item {i} is {c}.", "vague": "no idea."})
        )
    return groups


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A small random student (2 layers x 64) with a tokenizer trained on the short colour prompts."""
    texts = [chat.chat_text(g.prompt, r) for g in _short_groups(60) for r in g.responses.values()]
    tok = train_tokenizer(texts + ['{"has_principle": true, "title": ""}'], vocab_size=320)
    torch.manual_seed(7)
    model = FelixLM(
        FelixConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            d_model=64,
            n_head=2,
            n_kv_head=1,
            ffn_hidden=128,
            max_seq_len=48,
            init_std=0.08,
        )
    )
    directory = save_checkpoint(tmp_path_factory.mktemp("student") / "checkpoint", model, tok)
    return directory, model, tok


def test_snapshot_is_deterministic_batched_and_matches_a_plain_greedy_loop(student):
    _, model, tok = student
    prompts = [g.prompt for g in _short_groups(7)]
    a = greedy_responses(model, tok, prompts, max_new_tokens=10, batch_size=3)
    assert a == greedy_responses(model, tok, prompts, max_new_tokens=10, batch_size=3)
    assert a == greedy_responses(model, tok, prompts, max_new_tokens=10, batch_size=1)
    stop = {tok.eos_id, tok.token_id(chat.END)}
    for p, got in zip(prompts, a):  # independent: one sequence, argmax of the last logits, no padding
        ids = [tok.bos_id, *tok.encode(chat.chat_prompt(p))]
        budget, new = min(10, model.cfg.max_seq_len - 1 - len(ids)), []
        with torch.no_grad():
            while len(new) < budget:
                t = int(model(torch.tensor([ids]))[0, -1].argmax())
                if t in stop:
                    break
                ids.append(t)
                new.append(t)
        assert got == tok.decode(new)
    model.train()
    greedy_responses(model, tok, prompts[:1], max_new_tokens=2)
    assert model.training  # the mode it found is restored
    model.eval()


def test_sequence_logps_and_quail_term_against_full_logits(student, seed):
    _, model, tok = student
    groups = _short_groups(6)
    pairs = [distill.PreferencePair(g.prompt, None, "good", g.responses["good"], g.responses["vague"]) for g in groups]
    enc = distill.encode_pairs(pairs, tok, model.cfg.max_seq_len)
    rows, learn = torch.cat([enc.chosen, enc.rejected]), torch.cat([enc.chosen_learn, enc.rejected_learn])
    x, y = distill.response_targets(rows, learn)
    wl = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    wl[json_structure_whitelist(tok)] = True
    wl[y[y >= 0][::3]] = True  # make sure some learned targets are whitelisted
    margin, lam = 2.0, 0.1
    ce, hinge = distill.token_losses(model, x, y, wl, margin, lam, chosen_rows=len(pairs))
    with torch.no_grad():
        z = model(x).double()
    logp = torch.log_softmax(z, -1)
    mask = y != -100
    want = (logp.gather(-1, y.clamp_min(0)[..., None])[..., 0] * mask).sum(-1)
    n_tok = mask.sum(-1)
    # both sides take fp32 logits h W^T (d-term dot products, error <= d * 2^-24 * max|z| each) and the op adds a
    # log-sum-exp in fp32: per token <= 4 d 2^-24 max|z|, summed over the row's learned tokens
    bound = n_tok * 4 * model.cfg.d_model * 2**-24 * float(z.abs().max())
    assert ((-ce.double().sum(-1) - want).abs() <= bound).all()
    assert torch.equal(ce[~mask], torch.zeros_like(ce[~mask]))
    # the QUAIL term: lambda * mean over whitelisted chosen targets of relu(margin - (z_t - max other z))
    yc, zc = y[: len(pairs)], z[: len(pairs)]
    sel = (yc >= 0) & wl[yc.clamp_min(0)]
    zt = zc.gather(-1, yc.clamp_min(0)[..., None])[..., 0]
    other = zc.scatter(-1, yc.clamp_min(0)[..., None], float("-inf")).max(-1).values
    want_h = lam * torch.relu(margin - (zt - other))[sel].mean()
    assert sel.sum() > 0
    # the term is a sum over the chosen tokens of differences of two fp32 per-token losses (the CE parts cancel), each
    # off by <= 2 b (b: the per-token bound above), over the whitelisted count; the margins here are fp32 logits too
    b = 4 * model.cfg.d_model * 2**-24 * float(z.abs().max())
    n_chosen = int(mask[: len(pairs)].sum())
    assert abs(float(hinge.detach()) - float(want_h)) <= lam * 2 * b * (n_chosen / int(sel.sum()) + 1)
    # the no-gradient helper agrees with the differentiable path
    chosen = distill.sequence_logps(model, enc.chosen, enc.chosen_learn, batch_size=4)
    assert torch.allclose(chosen, -ce[: len(pairs)].sum(-1).detach(), atol=1e-4)


def test_pairs_skip_what_carries_no_preference(student):
    _, model, tok = student
    sel = teachers.select_responses(_short_groups(4) + [teachers.TeacherGroup("p", "principle", {"t": "{"})])
    student_out = ["item 0 is red.", "wrong", "wrong", "wrong", "x"]
    pairs, skipped = distill.build_pairs(sel, student_out)
    assert [p.prompt for p in pairs] == ["colour of item 1?", "colour of item 2?", "colour of item 3?"]
    assert skipped == {"no_valid_teacher": 1, "student_equals_teacher": 1}
    assert all(p.chosen.startswith("item") and p.rejected == "wrong" for p in pairs)
    with pytest.raises(teachers.DistillError, match="fits seq_len"):
        distill.encode_pairs(pairs, tok, seq_len=4)


def _soda_cfg(tmp_path, directory, **kw):
    base = dict(
        init_from=str(directory),
        out_dir=str(tmp_path / "soda"),
        batch_size=4,
        steps=24,
        lr=3e-3,
        warmup_steps=2,
        eval_every=8,
        max_new_tokens=8,
        val_fraction=0.25,
        beta=0.1,
        device="cpu",
    )
    return distill.SodaConfig(**{**base, **kw})


def test_tiny_soda_run_raises_the_reward_margin(student, tmp_path):
    directory, _, tok = student
    teacher = tmp_path / "teachers.jsonl"
    teachers.write_teacher_groups(_short_groups(24), teacher)
    res = distill.train_soda(
        _soda_cfg(tmp_path, directory, teacher_data=[str(teacher)]), log=lambda *_: None, progress=False
    )
    first, last = res.metrics[0], res.metrics[-1]
    assert first["step"] == 0 and first["val_reward_margin"] == 0.0  # policy == reference before the first step
    assert last["val_reward_margin"] > 1.0 and last["val_accuracy"] == 1.0
    early = sum(m["reward_margin"] for m in res.step_metrics[:4]) / 4
    late = sum(m["reward_margin"] for m in res.step_metrics[-4:]) / 4
    assert late > early + 1.0
    assert last["val_chosen_logp"] - last["val_rejected_logp"] > first["val_chosen_logp"] - first["val_rejected_logp"]
    out = res.out_dir
    assert [json.loads(s)["step"] for s in (out / METRICS_FILE).read_text().splitlines()] == [0, 8, 16, 24]
    snap = [json.loads(s) for s in (out / distill.SNAPSHOT_FILE).read_text().splitlines()]
    assert snap[0]["meta"]["init_from"] == str(directory) and len(snap) == 25
    assert (out / distill.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert (out / "teacher-agreement.md").is_file() and (out / "checkpoint" / distill.SODA_FILE).is_file()
    trained = Tokenizer.load(out / "checkpoint")
    assert trained.vocab_size == tok.vocab_size
    # the reference stayed the snapshot: the saved student differs from it
    a, b = load_checkpoint(directory).state_dict(), load_checkpoint(out / "checkpoint").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the NLL anchor keeps the teacher responses likelier than DPO alone leaves them
    anchored = distill.train_soda(
        _soda_cfg(tmp_path, directory, teacher_data=[str(teacher)], nll_weight=1.0, out_dir=str(tmp_path / "soda-nll")),
        log=lambda *_: None,
        progress=False,
    )
    assert anchored.metrics[-1]["val_chosen_logp"] > last["val_chosen_logp"]
    assert anchored.metrics[-1]["val_reward_margin"] > 0 and anchored.step_metrics[-1]["nll"] > 0


def test_soda_refusals(student, tmp_path):
    directory, _, _ = student
    with pytest.raises(ValueError, match="--init-from"):
        distill.SodaConfig(init_from="")
    with pytest.raises(ValueError, match="beta and lr"):
        distill.SodaConfig(init_from="x", beta=0.0)
    with pytest.raises(ValueError, match="nll_weight"):
        distill.SodaConfig(init_from="x", nll_weight=-1.0)
    with pytest.raises(teachers.DistillError, match="overwrite the student"):
        distill.train_soda(_soda_cfg(tmp_path, directory, out_dir=str(directory.parent)), log=lambda *_: None)
    with pytest.raises(teachers.DistillError, match="exceeds the student's max_seq_len"):
        distill.train_soda(_soda_cfg(tmp_path, directory, seq_len=4096), log=lambda *_: None)


def test_felix_train_soda_cli(student, tmp_path, capsys):
    directory, _, _ = student
    assert main(["train", "--soda", "--init-from", str(directory), "--preset", "tiny"]) == 2
    assert "not used by --soda: --preset" in capsys.readouterr().err
    teacher = tmp_path / "t.jsonl"
    teachers.write_teacher_groups(_short_groups(12), teacher)
    args = [
        "train",
        "--soda",
        "--init-from",
        str(directory),
        "--teacher-data",
        str(teacher),
        "--out-dir",
        str(tmp_path / "cli"),
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--max-new-tokens",
        "4",
        "--beta",
        "0.2",
        "--teacher-scorer",
        "shortest",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "cli" / distill.SODA_FILE).read_text())
    assert summary["config"]["beta"] == 0.2 and summary["config"]["teacher_scorer"] == "shortest"
    assert summary["selected"]["vague"] == 12  # the shortest answer, as asked
    capsys.readouterr()
    assert main(args) == 2  # the directory holds a run: refused, as `felix train` refuses it
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # the run flags reach the one loop
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    assert (
        main(
            [
                "train",
                "--soda",
                "--init-from",
                str(directory),
                "--teacher-data",
                str(tmp_path / "bad.jsonl"),
                "--out-dir",
                str(tmp_path / "cli2"),
            ]
        )
        == 2
    )
    assert "bad.jsonl:1:" in capsys.readouterr().err


def test_teacher_data_cli_writes_groups_and_agreement(tmp_path, student):
    directory, _, _ = student
    out = tmp_path / "harvest.jsonl"
    assert (
        main(
            [
                "teacher-data",
                str(out),
                "--n-records",
                "12",
                "--task",
                "principle",
                "--task",
                "synthesis",
                "--teacher-checkpoint",
                f"felix-small={directory}",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    groups = teachers.load_teacher_groups([out])
    assert len(groups) == 12 and {g.task for g in groups} == {"principle", "synthesis"}
    assert all(set(g.responses) <= {"exact", "noisy", "sloppy", "felix-small"} for g in groups)
    rep = json.loads((tmp_path / "teacher-agreement.json").read_text())
    assert rep["teachers"][:3] == ["exact", "noisy", "sloppy"] and "exact vs noisy" in rep["overall"]["pairs"]


# ------------------------------------------------------------------------------ SODA in the one loop
def test_soda_run_takes_the_run_lock(student, tmp_path):
    """A SODA run claims its directory as `felix train` does: a directory another process holds is refused, naming
    the holder, before anything is written; a finished run is not silently replaced."""
    directory, _, _ = student
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, json, os, time\n"
                f"fd = os.open({str(out / runs.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'lockhost', 'started': 'then'}).encode())\n"
                "print('locked', flush=True)\n"
                "time.sleep(120)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunDirectoryError, match=f"in use by pid {holder.pid} on host lockhost"):
            distill.train_soda(_soda_cfg(tmp_path, directory, out_dir=str(out)), log=lambda *_: None, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [runs.LOCK_FILE]  # refused before writing anything


def _same_records(a: list[dict], b: list[dict]) -> bool:
    """Metrics records equal but for the process's peak memory (a resumed process has its own)."""

    def strip(records):
        return [{k: v for k, v in r.items() if not k.startswith("peak_memory")} for r in records]

    return strip(a) == strip(b)


def test_soda_resume_reproduces_the_uninterrupted_run_and_metrics_are_the_loops(student, tmp_path):
    directory, _, _ = student
    teacher = tmp_path / "teachers.jsonl"
    teachers.write_teacher_groups(_short_groups(16), teacher)
    quiet = dict(log=lambda *_: None, progress=False)
    kw = dict(teacher_data=[str(teacher)], steps=8, eval_every=4)
    full = distill.train_soda(_soda_cfg(tmp_path, directory, out_dir=str(tmp_path / "full"), **kw), **quiet)
    cfg = _soda_cfg(tmp_path, directory, out_dir=str(tmp_path / "split"), **kw)
    first = distill.train_soda(cfg, stop_at=3, **quiet)
    assert [m["step"] for m in first.step_metrics] == [1, 2, 3]
    assert runs.load_trainer_state(tmp_path / "split" / "checkpoint")["step"] == 3
    with pytest.raises(runs.RunDirectoryError, match="already holds a run"):
        distill.train_soda(cfg, **quiet)  # neither resume nor overwrite: refused
    resumed = distill.train_soda(cfg, resume=True, **quiet)
    assert resumed.step_metrics == full.step_metrics  # bit-exact on CPU
    assert _same_records(resumed.metrics, full.metrics) and resumed.pairs == full.pairs
    a, b = (
        load_checkpoint(tmp_path / "full" / "checkpoint").state_dict(),
        load_checkpoint(tmp_path / "split" / "checkpoint").state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics are the loop's metrics.jsonl: SODA's numbers beside the shared ones, each record once after resume
    for res, name in ((full, "full"), (resumed, "split")):
        lines = [json.loads(s) for s in (tmp_path / name / METRICS_FILE).read_text().splitlines()]
        assert [r["step"] for r in lines] == [0, 4, 8] and _same_records(lines, res.metrics)
    last = lines[-1]
    assert {
        "train_loss",
        "train_dpo_loss",
        "train_nll",
        "train_reward_margin",
        "val_reward_margin",
        "val_accuracy",
        "skipped_steps",
        "loss_spikes",
        "peak_memory_mb",
    } <= set(last)
    assert last["skipped_steps"] == 0 and last["train_loss"] == pytest.approx(
        sum(m["loss"] for m in full.step_metrics[4:]) / 4
    )
    summary = json.loads((tmp_path / "split" / "checkpoint" / distill.SODA_FILE).read_text())
    assert summary["last"]["step"] == 8 and summary["pairs"]["train"] + summary["pairs"]["val"] == full.pairs
