"""felix.verify.task_eval: the built-in suite, schema checks, the rule grader's rubric, the LLM-grader interface, joint-min
aggregation, the ensemble (best-of teachers), report files, bad input, and `felix eval-tasks`."""

from __future__ import annotations

import json

import pytest

from felix.tasks import records as task_records
from felix.data.teachers import TeacherGroup
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses
from felix.verify import task_eval
from felix.verify.task_eval import LLMGrader, RuleGrader, TaskEvalError, TaskItem


@pytest.fixture(scope="module")
def suite():
    return task_eval.builtin_task_suite(per_task=3)


def test_builtin_suite_is_seeded_apart_and_has_references(suite):
    assert [i.task for i in suite[:4]] == list(task_records.TASKS) and len(suite) == 12
    assert suite == task_eval.builtin_task_suite(per_task=3)
    train_prompts = {r["prompt"] for r in task_records.structured_records(2000, seed=0)}
    assert not {i.prompt for i in suite} & train_prompts
    assert all(task_eval.schema_check(i.task, i.reference)["compliant"] for i in suite)
    with pytest.raises(TaskEvalError, match="per_task"):
        task_eval.builtin_task_suite(0)


def test_schema_check_per_task():
    ok = json.dumps({"title": "t", "summary": "s", "concepts": [], "salience": 0.5})
    assert task_eval.schema_check("episode", ok) == {"compliant": True, "checked": True, "problems": []}
    missing = task_eval.schema_check("episode", json.dumps({"title": "t"}))
    assert not missing["compliant"] and any("missing field 'summary'" in p for p in missing["problems"])
    assert not task_eval.schema_check("episode", '{"title": ')["compliant"]
    assert task_eval.schema_check("synthesis", "One. Two. Three.")["compliant"]
    assert "1 sentences" in task_eval.schema_check("synthesis", "Only one")["problems"][0]
    assert "6 sentences" in task_eval.schema_check("synthesis", "A. B. C. D. E. F.")["problems"][0]
    assert "JSON where prose" in task_eval.schema_check("synthesis", '{"a": 1}')["problems"][0]
    assert task_eval.schema_check(None, "anything") == {"compliant": True, "checked": False, "problems": []}


def test_rule_grader_rubric(suite):
    g = RuleGrader()
    for item in suite:  # the reference itself is perfect on every criterion
        assert g.grade(item, item.reference).score == 5.0
    principle = next(i for i in suite if i.task == "principle")
    ref = json.loads(principle.reference)
    flipped = g.grade(principle, json.dumps({**ref, "has_principle": not ref["has_principle"]}))
    assert flipped.criteria["decision"] == 1.0 and flipped.score == 1.0 and flipped.criteria["format"] == 5.0
    assert g.grade(principle, "not json").score == 1.0
    no_conf = {k: v for k, v in ref.items() if k != "confidence"}
    broken = g.grade(principle, json.dumps(no_conf))
    assert broken.criteria["format"] == 3.0 and broken.score <= 3.0 and "confidence" in broken.notes
    synthesis = next(i for i in suite if i.task == "synthesis")
    half = " ".join(task_eval.sentences(synthesis.reference)[:2])
    grade = g.grade(synthesis, half)
    assert grade.criteria["content"] == pytest.approx(1 + 4 * task_eval.word_f1(half, synthesis.reference))
    assert grade.score == min(grade.criteria.values())
    with pytest.raises(TaskEvalError, match="needs a reference"):
        g.grade(TaskItem("x", "episode", "p"), "{}")


def test_value_match_and_word_f1():
    assert task_eval.word_f1("the cat sat", "the cat sat") == 1.0
    assert task_eval.word_f1("a b", "c d") == 0.0
    assert task_eval.word_f1("a b c d", "a b") == pytest.approx(2 * (0.5 * 1.0) / 1.5)
    assert task_eval.value_match(0.5, 0.75) == pytest.approx(0.5)
    assert task_eval.value_match(True, 1) == 0.0  # a boolean is not the number 1
    assert task_eval.value_match(["a", "b"], ["b", "c"]) == pytest.approx(0.5)
    assert task_eval.value_match({"a": "x y", "b": 1}, {"a": "x y", "b": 1}) == 1.0


class FixedJudge:
    """A stand-in for a judge model: replies with a fixed score per output text (what an API client would be)."""

    def __init__(self, scores):
        self.scores, self.prompts = scores, []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        output = prompt.split("Answer to grade:\n", 1)[1].split("\n\nRubric", 1)[0]
        return f"Score: {self.scores.get(output, 3)}\nbecause."


def test_llm_grader_interface(suite):
    with pytest.raises(TaskEvalError, match="completion function"):
        LLMGrader(None)
    judge = FixedJudge({"great": 5})
    g = LLMGrader(judge, name="judge")
    item = suite[0]
    assert g.grade(item, "great").score == 5.0 and g.grade(item, "meh").score == 3.0
    assert item.prompt in judge.prompts[0] and item.reference in judge.prompts[0] and "Score: N" in judge.prompts[0]
    assert item.reference not in LLMGrader(judge, show_reference=False).prompt(item, "x")
    with pytest.raises(TaskEvalError, match="without a 'Score: N' line"):
        LLMGrader(lambda p: "I like it").grade(item, "x")


def _systems(suite):
    records = [{"prompt": i.prompt, "response": i.reference, "task": i.task} for i in suite]
    outs = {t: builtin_teacher_responses(records, t, seed=1) for t in BUILTIN_TEACHERS}
    outs["student"] = ["{" for _ in suite]
    return outs


def test_report_joint_min_over_graders_ensemble_and_aggregation(suite, tmp_path):
    outs = _systems(suite)
    judge = LLMGrader(FixedJudge({outs["sloppy"][0]: 5, outs["exact"][0]: 2}), name="judge")
    rep = task_eval.evaluate_systems(suite, outs, ["exact", "noisy", "sloppy"], [RuleGrader(), judge], {"run": "t"})
    assert rep["schema"] == task_eval.SCHEMA_NAME and rep["tasks"] == list(task_records.TASKS)
    assert list(rep["systems"]) == ["exact", "noisy", "sloppy", "student", "ensemble"]
    assert rep["systems"]["student"]["role"] == "student" and rep["systems"]["ensemble"]["role"] == "ensemble"
    rule = RuleGrader()
    for name in ("exact", "noisy", "sloppy", "student"):
        for item, out, row in zip(suite, outs[name], rep["rows"][name]):
            judged = 5 if out == outs["sloppy"][0] else 2 if out == outs["exact"][0] else 3
            assert row["joint"] == min(rule.grade(item, out).score, judged)  # joint = min over graders
    # per task: the mean joint score; per system: mean over tasks and the worst task
    for name, s in rep["systems"].items():
        rows = rep["rows"][name]
        for task in rep["tasks"]:
            sub = [r["joint"] for r in rows if r["task"] == task]
            assert s["per_task"][task]["joint"] == pytest.approx(sum(sub) / len(sub))
            assert s["per_task"][task]["compliant"] == sum(r["compliant"] for r in rows if r["task"] == task)
        means = [s["per_task"][t]["joint"] for t in rep["tasks"]]
        assert s["joint_min"] == min(means) and s["mean_joint"] == pytest.approx(sum(means) / len(means))
    # the ensemble: per item the best teacher by joint score (ties: the first teacher listed)
    for i, row in enumerate(rep["rows"]["ensemble"]):
        joints = {t: rep["rows"][t][i]["joint"] for t in ("exact", "noisy", "sloppy")}
        best = max(joints.values())
        assert row["joint"] == best and row["from"] == next(t for t in joints if joints[t] == best)
    assert sum(rep["systems"]["ensemble"]["best_of_wins"].values()) == len(suite)
    assert rep["systems"]["ensemble"]["mean_joint"] >= max(rep["systems"][t]["mean_joint"] for t in joints)
    files = task_eval.write_task_report(rep, tmp_path)
    assert json.loads(files["json"].read_text())["systems"]["exact"]["per_task"]["encoding"]["items"] == 3
    md = files["markdown"].read_text()
    assert "| student | student |" in md and "joint-min" in md and "task-eval.png" in md
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_harness_bad_input(suite):
    outs = _systems(suite)
    with pytest.raises(TaskEvalError, match="has 2 outputs for 12"):
        task_eval.evaluate_systems(suite, {**outs, "student": ["a", "b"]}, ["exact"])
    with pytest.raises(TaskEvalError, match="have no outputs"):
        task_eval.evaluate_systems(suite, outs, ["gpt"])
    with pytest.raises(TaskEvalError, match="rename"):
        task_eval.evaluate_systems(suite, {"ensemble": outs["exact"]}, [])
    with pytest.raises(TaskEvalError, match="distinct"):
        task_eval.evaluate_systems(suite, outs, [], [RuleGrader(), RuleGrader()])
    with pytest.raises(TaskEvalError, match="outside Likert"):
        task_eval.evaluate_systems(
            suite, outs, [], [LLMGrader(lambda p: "Score: 5", name="a"), LLMGrader(lambda p: "score = 5.5", name="b")]
        )
    with pytest.raises(TaskEvalError, match="empty"):
        task_eval.evaluate_systems([], outs, [])


def test_teacher_outputs_must_cover_the_suite(suite):
    groups = [TeacherGroup(i.prompt, i.task, {"a": i.reference}) for i in suite]
    assert task_eval.teacher_outputs_from_groups(suite, groups)["a"] == [i.reference for i in suite]
    with pytest.raises(TaskEvalError, match="no response to 1 of the 12"):
        task_eval.teacher_outputs_from_groups(suite, groups[:-1])


def test_felix_eval_tasks_cli(tmp_path, capsys):
    from felix.cli.main import main

    harvest = tmp_path / "suite.jsonl"
    assert (
        main(
            [
                "teacher-data",
                str(harvest),
                "--suite",
                "--per-task",
                "2",
                "--builtin-teacher",
                "exact",
                "--builtin-teacher",
                "noisy",
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert main(["eval-tasks", "--teacher-data", str(harvest), "--per-task", "2", "--out-dir", str(out)]) == 0
    rep = json.loads((out / "task-eval.json").read_text())
    assert rep["teachers"] == ["exact", "noisy"] and rep["systems"]["exact"]["mean_joint"] == 5.0
    assert (out / "task-eval.md").is_file() and (out / "task-eval.png").is_file()
    # a suite of another size does not match the harvest's prompts: refused, naming the gap
    assert main(["eval-tasks", "--teacher-data", str(harvest), "--per-task", "3", "--out-dir", str(out)]) == 2
    assert "felix teacher-data --suite" in capsys.readouterr().err
    assert main(["eval-tasks", "--student", f"s={tmp_path / 'missing'}", "--out-dir", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # NAME=DIR is required
        main(["eval-tasks", "--student", "no-name-given"])
