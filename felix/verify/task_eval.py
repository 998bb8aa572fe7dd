"""The task-suite evaluation harness: student vs teachers vs the teacher ensemble, per task (`felix eval-tasks`).

The seed's headline comparison, on Felix's built-in task suite (felix.tasks: memory encoding, episode
summarization, principle abstraction with its ``has_principle: false`` refusal path, retrieval synthesis). The suite,
the compliance check and the graders live in felix.tasks (re-exported here); this module is the harness:

* **Systems**: any number of named output lists over the same suite items -- a student checkpoint's greedy
  generations (:func:`felix.model.generate.greedy_responses`), teachers' responses (a teacher JSONL, the built-in
  synthetic teachers of :mod:`felix.tasks.perturbations`, or a bigger Felix checkpoint), and the **ensemble**: per
  item, the teacher output the graders score best (best-of by the rubric, ties to the first teacher listed).
* **Schema compliance** per output (:func:`schema_check`): the JSON tasks through felix.tasks' checker
  (valid JSON object, required fields, types, enum values); synthesis is prose of 2-5 sentences.
* **Rubric scores** (Likert 1-5) from pluggable graders (:class:`Grader`): :class:`RuleGrader` is built in
  (deterministic, needs the item's reference answer); :class:`LLMGrader` is the interface for a judge model --
  it builds the rubric prompt and parses the reply, and takes the completion function from the caller (nothing
  can be called from here).
* **Joint-min aggregation**: an output's score is the *minimum* over graders (the cross-grader joint min: an
  answer is as good as its harshest judge finds it), and a grader's own score is the minimum over its rubric
  criteria. Per system and task: the mean joint score and the compliance rate; per system: the mean over tasks and
  the ``joint_min`` over tasks (its worst task).

:func:`write_task_report` writes ``task-eval.json``, ``task-eval.md`` and ``task-eval.png`` (atomically).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from felix.core.files import atomic_write_text, jsonable, save_figure
from felix.tasks import (  # noqa: F401 (re-exported: the suite, compliance and graders lived here)
    LIKERT_MAX,
    LIKERT_MIN,
    LLM_RUBRIC,
    SUITE_SEED,
    SYNTHESIS_SENTENCES,
    Grade,
    Grader,
    LLMGrader,
    RuleGrader,
    TaskEvalError,
    TaskItem,
    builtin_task_suite,
    schema_check,
    sentences,
    task_schema,
    value_match,
    word_f1,
    words,
)

SCHEMA_NAME, SCHEMA_VERSION = "felix-task-eval", 1
ENSEMBLE = "ensemble"


# ========================================================================================= the harness
def _check_outputs(items: list[TaskItem], outputs: dict[str, list[str]]) -> None:
    if not items:
        raise TaskEvalError("the task suite is empty")
    if not outputs:
        raise TaskEvalError("no systems to evaluate")
    if ENSEMBLE in outputs:
        raise TaskEvalError(f"{ENSEMBLE!r} is the harness's own system (best-of the teachers); rename that system")
    for name, outs in outputs.items():
        if len(outs) != len(items):
            raise TaskEvalError(f"system {name!r} has {len(outs)} outputs for {len(items)} suite items")
        bad = [i for i, o in enumerate(outs) if not isinstance(o, str)]
        if bad:
            raise TaskEvalError(f"system {name!r}: output {bad[0]} is {type(outs[bad[0]]).__name__}, not a string")


def grade_outputs(items: list[TaskItem], outs: list[str], graders: list[Grader]) -> list[dict]:
    """Per item: compliance, each grader's grade, and the joint (minimum over graders) score."""
    rows = []
    for item, out in zip(items, outs):
        grades = {g.name: g.grade(item, out) for g in graders}
        for gname, gr in grades.items():
            if not LIKERT_MIN <= gr.score <= LIKERT_MAX:
                raise TaskEvalError(f"grader {gname!r} gave {gr.score} for {item.id}, outside Likert 1-5")
        rows.append(
            {
                "item": item.id,
                "task": item.task,
                "output": out,
                **schema_check(item.task, out),
                "grades": {k: asdict(v) for k, v in grades.items()},
                "joint": min(v.score for v in grades.values()),
            }
        )
    return rows


def ensemble_rows(teacher_rows: dict[str, list[dict]]) -> tuple[list[dict], dict[str, int]]:
    """Best-of the teachers per item by joint score (ties: the first teacher listed); also how often each won."""
    names = list(teacher_rows)
    n = len(teacher_rows[names[0]])
    rows, wins = [], {t: 0 for t in names}
    for i in range(n):
        best = max(names, key=lambda t: (teacher_rows[t][i]["joint"], -names.index(t)))
        wins[best] += 1
        rows.append({**teacher_rows[best][i], "from": best})
    return rows, wins


def summarize_rows(rows: list[dict], tasks: list[str], graders: list[str]) -> dict:
    per_task = {}
    for task in tasks:
        sub = [r for r in rows if r["task"] == task]
        per_task[task] = {
            "items": len(sub),
            "compliant": sum(r["compliant"] for r in sub),
            "compliance": sum(r["compliant"] for r in sub) / len(sub),
            "joint": sum(r["joint"] for r in sub) / len(sub),
            "by_grader": {g: sum(r["grades"][g]["score"] for r in sub) / len(sub) for g in graders},
        }
    means = [per_task[t]["joint"] for t in tasks]
    return {
        "per_task": per_task,
        "mean_joint": sum(means) / len(means),
        "joint_min": min(means),
        "worst_task": tasks[means.index(min(means))],
        "compliance": sum(r["compliant"] for r in rows) / len(rows),
    }


def evaluate_systems(
    items: list[TaskItem],
    outputs: dict[str, list[str]],
    teachers: list[str],
    graders: list[Grader] | None = None,
    meta: dict | None = None,
) -> dict:
    """The report: every system (and the ensemble of `teachers`) graded on every item, summarized per task.
    `outputs`: {system name: one output string per item, in suite order}; `teachers` names which of them are
    teachers (the ensemble is their best-of; none: no ensemble)."""
    graders = graders if graders is not None else [RuleGrader()]
    if not graders:
        raise TaskEvalError("give at least one grader")
    names = [g.name for g in graders]
    if len(set(names)) != len(names):
        raise TaskEvalError(f"grader names must be distinct, got {names}")
    _check_outputs(items, outputs)
    unknown = [t for t in teachers if t not in outputs]
    if unknown:
        raise TaskEvalError(f"teacher(s) {unknown} have no outputs; systems: {list(outputs)}")
    tasks = list(dict.fromkeys(i.task for i in items))
    graded = {name: grade_outputs(items, outs, graders) for name, outs in outputs.items()}
    wins = None
    if teachers:
        graded[ENSEMBLE], wins = ensemble_rows({t: graded[t] for t in teachers})
    systems = {
        name: {
            "role": ("ensemble" if name == ENSEMBLE else "teacher" if name in teachers else "student"),
            **summarize_rows(rows, tasks, names),
        }
        for name, rows in graded.items()
    }
    if wins is not None:
        systems[ENSEMBLE]["best_of_wins"] = wins
    return {
        "schema": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "meta": meta or {},
        "tasks": tasks,
        "graders": names,
        "teachers": list(teachers),
        "items": [asdict(i) for i in items],
        "systems": systems,
        "rows": graded,
        "aggregation": "joint score of an output = min over graders (a rule grader's score = min over its rubric "
        "criteria); per task: mean joint score; per system: mean over tasks and joint_min = the "
        "worst task's mean",
    }


# ============================================================================================ report
def markdown_report(report: dict, plot_name: str | None = None) -> str:
    tasks, systems = report["tasks"], report["systems"]
    lines = ["# Task-suite evaluation", ""]
    meta = report.get("meta") or {}
    for k, v in meta.items():
        lines.append(f"* {k}: {v}")
    lines += [
        f"* graders: {', '.join(report['graders'])}; teachers: {', '.join(report['teachers']) or 'none'}",
        f"* aggregation: {report['aggregation']}",
        "",
        "## Rubric score (joint min over graders, Likert 1-5), per task",
        "",
        "| system | role | " + " | ".join(tasks) + " | mean | joint-min (worst task) |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for name, s in systems.items():
        lines.append(
            f"| {name} | {s['role']} | "
            + " | ".join(f"{s['per_task'][t]['joint']:.2f}" for t in tasks)
            + f" | {s['mean_joint']:.2f} | {s['joint_min']:.2f} ({s['worst_task']}) |"
        )
    lines += [
        "",
        "## Schema compliance, per task (compliant / items)",
        "",
        "| system | " + " | ".join(tasks) + " | overall |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]
    for name, s in systems.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{s['per_task'][t]['compliant']}/{s['per_task'][t]['items']}" for t in tasks)
            + f" | {100 * s['compliance']:.0f}% |"
        )
    if ENSEMBLE in systems:
        wins = systems[ENSEMBLE]["best_of_wins"]
        lines += [
            "",
            "Ensemble = per item the best teacher output by the joint score; picked: "
            + ", ".join(f"{t} {n}" for t, n in wins.items())
            + ".",
        ]
    if plot_name:
        lines += ["", f"![rubric and compliance per task]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, systems = report["tasks"], report["systems"]
    names = list(systems)
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, (key, label, scale) in enumerate(
        (("joint", "rubric score (joint min, 1-5)", 1.0), ("compliance", "schema compliance (%)", 100.0))
    ):
        ax = axes[k]
        for j, name in enumerate(names):
            vals = [scale * systems[name]["per_task"][t][key] for t in tasks]
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(tasks))], vals, width, label=name)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if key == "joint":
            ax.set_ylim(0, LIKERT_MAX + 0.2)
        else:
            ax.set_ylim(0, 105)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 7), fontsize=8)
    fig.suptitle("student vs teachers vs ensemble, per task")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_task_report(report: dict, out_dir, stem: str = "task-eval") -> dict[str, Path]:
    """``<stem>.json`` (everything, every output and grade), ``<stem>.md`` (the tables), ``<stem>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    plot_report(report, png)
    return {
        "json": atomic_write_text(out / f"{stem}.json", json.dumps(jsonable(report), indent=1)),
        "markdown": atomic_write_text(out / f"{stem}.md", markdown_report(report, png.name)),
        "plot": png,
    }


# ================================================================================== teacher outputs
def teacher_outputs_from_groups(items: list[TaskItem], groups) -> dict[str, list[str]]:
    """Each teacher's response to every suite item, from felix.data.teachers teacher groups matched by prompt. A teacher
    that misses suite prompts is refused (naming how many and one of them)."""
    by_prompt = {g.prompt: g for g in groups}
    teachers = list(dict.fromkeys(t for g in groups for t in g.responses))
    out = {}
    for t in teachers:
        missing = [i for i in items if i.prompt not in by_prompt or t not in by_prompt[i.prompt].responses]
        if missing:
            raise TaskEvalError(
                f"teacher {t!r} has no response to {len(missing)} of the {len(items)} suite prompts "
                f"(e.g. {missing[0].id}); write suite teacher data with `felix teacher-data --suite`"
            )
        out[t] = [by_prompt[i.prompt].responses[t] for i in items]
    return out
