"""Teacher data for distillation: several teachers' responses per prompt, read, written and made.

* :func:`load_teacher_groups`: JSONL with several teachers per prompt, either one line per prompt
  ``{"prompt", "task"?, "responses": {teacher: response, ...}}`` or one line per teacher response
  ``{"prompt", "response", "teacher", "task"?}`` (felix.data.corpus.load_teacher_records' format), grouped by prompt. Any
  malformed line is an error naming ``path:line``; so is one teacher giving two different responses to a prompt.
* :func:`builtin_teacher_groups`: task records (felix.tasks.records) answered by the built-in teachers
  (felix.tasks.perturbations: exact, noisy, sloppy), no download.
* :func:`checkpoint_teacher`: a trained Felix checkpoint as a teacher (its greedy responses, felix.model.generate).
* **Selection** (:func:`select_responses`): per prompt, the schema-valid responses first (felix.tasks' schema
  check of the prompt's task), then the best of that tier by a swappable scorer (``consensus``: agreement
  with the other teachers; ``shortest``; or any callable ``(group, teacher) -> float``); ties go to the teacher
  listed first.
* **Agreement** (:func:`teacher_agreement`, :func:`write_agreement_report`): per teacher validity and how often it
  was selected; per teacher pair exact agreement, word F1, and agreement on the principle task's ``has_principle``
  decision; overall and per task.

Selection and agreement are facts about the teacher data alone (no student, no training): `felix teacher-data`
reports them, and a distillation objective (felix.train.distill) trains on what :func:`select_responses` picks.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

from felix.core.files import atomic_write_text, jsonl_lines, read_text, save_figure
from felix.model.generate import greedy_responses
from felix.model.felix_lm import load_checkpoint
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses
from felix.tasks import schema_check, word_f1
from felix.tasks.records import TASKS, structured_records
from felix.model.tokenizer import Tokenizer

AGREEMENT_STEM = "teacher-agreement"  # the agreement report's files: <stem>.json, .md and .png


class DistillError(ValueError):
    """Teacher data or a distillation (SODA) setup that cannot be used (the message names the file:line or the
    problem)."""


@dataclass
class TeacherGroup:
    """One prompt and every teacher's response to it (teachers in the order first seen)."""

    prompt: str
    task: str | None
    responses: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)  # teacher -> "path:line"


def _nonempty_str(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def load_teacher_groups(paths) -> list[TeacherGroup]:
    """Read teacher JSONL files (see the module docstring for the two line formats) into one group per prompt, in
    first-seen order. Every malformed line, and every conflict, raises :class:`DistillError` naming ``path:line``."""
    groups: dict[str, TeacherGroup] = {}
    problems = []
    paths = [Path(p) for p in paths]
    if not paths:
        raise DistillError("no teacher files given")
    for path in paths:
        for where, obj, problem in jsonl_lines(read_text(path, DistillError, "teacher file"), path):
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            if not isinstance(obj, dict) or not _nonempty_str(obj.get("prompt")):
                problems.append(f"{where}: expected an object with a non-empty string 'prompt'")
                continue
            task = obj.get("task")
            if task is not None and not _nonempty_str(task):
                problems.append(f"{where}: 'task' must be a non-empty string when given")
                continue
            if "responses" in obj:
                resp = obj["responses"]
                if not (
                    isinstance(resp, dict)
                    and resp
                    and all(_nonempty_str(k) and _nonempty_str(v) for k, v in resp.items())
                ):
                    problems.append(f"{where}: 'responses' must map teacher names to non-empty response strings")
                    continue
                pairs = list(resp.items())
            elif _nonempty_str(obj.get("response")) and _nonempty_str(obj.get("teacher")):
                pairs = [(obj["teacher"], obj["response"])]
            else:
                problems.append(
                    f"{where}: expected 'responses' {{teacher: response}}, or non-empty strings "
                    f"'response' and 'teacher'"
                )
                continue
            g = groups.setdefault(obj["prompt"], TeacherGroup(obj["prompt"], task, {}, {}))
            if task is not None and g.task is not None and task != g.task:
                problems.append(
                    f"{where}: task {task!r} for a prompt that {next(iter(g.sources.values()))} gave task {g.task!r}"
                )
                continue
            g.task = g.task or task
            for teacher, response in pairs:
                if teacher in g.responses and g.responses[teacher] != response:
                    problems.append(
                        f"{where}: teacher {teacher!r} already gave a different response to this prompt "
                        f"at {g.sources[teacher]}"
                    )
                    continue
                g.responses.setdefault(teacher, response)
                g.sources.setdefault(teacher, where)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DistillError(f"{len(problems)} malformed teacher line(s):\n  {shown}")
    if not groups:
        raise DistillError(f"no teacher records in {', '.join(map(str, paths))}")
    return list(groups.values())


def write_teacher_groups(groups: list[TeacherGroup], path) -> Path:
    """Write groups as one-line-per-prompt JSONL (atomically)."""
    lines = [
        json.dumps({"prompt": g.prompt, **({"task": g.task} if g.task else {}), "responses": g.responses})
        for g in groups
    ]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def builtin_teacher_groups(n: int, seed: int = 0, tasks=TASKS, teachers=BUILTIN_TEACHERS) -> list[TeacherGroup]:
    """`n` task records (felix.tasks.records.structured_records(n, seed, tasks)) with every built-in teacher's response."""
    records = structured_records(n, seed, tuple(tasks))
    by_teacher = {t: builtin_teacher_responses(records, t, seed) for t in teachers}
    groups: dict[str, TeacherGroup] = {}
    for i, r in enumerate(records):  # a repeated prompt (rare) keeps its first record
        groups.setdefault(
            r["prompt"],
            TeacherGroup(
                r["prompt"],
                r["task"],
                {t: by_teacher[t][i] for t in teachers},
                {t: f"builtin:{seed}:{i}" for t in teachers},
            ),
        )
    return list(groups.values())


def checkpoint_teacher(
    name: str,
    checkpoint,
    groups: list[TeacherGroup],
    max_new_tokens: int = 192,
    batch_size: int = 16,
    device="cpu",
    progress: bool = False,
) -> list[TeacherGroup]:
    """Add a trained Felix checkpoint as teacher `name`: its greedy responses to every group's prompt."""
    model, tok = load_checkpoint(checkpoint, device), Tokenizer.load(checkpoint)
    outs = greedy_responses(
        model, tok, [g.prompt for g in groups], max_new_tokens, batch_size, progress, desc=f"teacher {name}"
    )
    for g, out in zip(groups, outs):
        if name in g.responses:
            raise DistillError(f"teacher {name!r} already answers prompt {g.prompt[:60]!r}")
        if out.strip():
            g.responses[name] = out
            g.sources[name] = f"checkpoint:{checkpoint}"
    return groups


# ========================================================================================== selection
def consensus_score(group: TeacherGroup, teacher: str) -> float:
    """Mean word F1 of the teacher's response with every other teacher's response to the same prompt (0 alone)."""
    others = [r for t, r in group.responses.items() if t != teacher]
    return sum(word_f1(group.responses[teacher], r) for r in others) / len(others) if others else 0.0


def shortest_score(group: TeacherGroup, teacher: str) -> float:
    """Prefer the most concise answer (minus its length in characters)."""
    return -float(len(group.responses[teacher]))


SCORERS = {"consensus": consensus_score, "shortest": shortest_score}


@dataclass
class Selection:
    prompt: str
    task: str | None
    teacher: str
    response: str
    valid: bool  # the chosen response passes its task's schema check
    score: float
    n_valid: int  # how many teachers gave a schema-valid response
    validity: dict  # teacher -> schema-valid


def _resolve_scorer(scorer):
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise DistillError(f"unknown teacher scorer {scorer!r}; choose from {', '.join(SCORERS)} or pass a callable")
    return SCORERS[scorer]


def select_responses(groups: list[TeacherGroup], scorer="consensus") -> list[Selection]:
    """Per prompt: the schema-valid responses first, then the best by `scorer` (a name in SCORERS or a callable
    ``(group, teacher) -> float``); ties go to the teacher listed first. With no valid response the best invalid
    one is returned, marked ``valid=False``."""
    score_fn = _resolve_scorer(scorer)
    out = []
    for g in groups:
        validity = {t: schema_check(g.task, r)["compliant"] for t, r in g.responses.items()}
        teachers = list(g.responses)
        tier = [t for t in teachers if validity[t]] or teachers
        scores = {t: float(score_fn(g, t)) for t in tier}
        best = max(tier, key=lambda t: (scores[t], -teachers.index(t)))
        out.append(
            Selection(
                g.prompt,
                g.task,
                best,
                g.responses[best],
                validity[best],
                scores[best],
                sum(validity.values()),
                validity,
            )
        )
    return out


# ========================================================================================== agreement
def _decision(text: str):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj.get("has_principle") if isinstance(obj, dict) and isinstance(obj.get("has_principle"), bool) else None


def _pair_stats(groups: list[TeacherGroup], a: str, b: str) -> dict:
    common = [g for g in groups if a in g.responses and b in g.responses]
    if not common:
        return {
            "prompts": 0,
            "exact": None,
            "word_f1": None,
            "both_valid": None,
            "decision_agreement": None,
            "decisions": 0,
        }
    decisions = [
        (da, db)
        for g in common
        for da, db in [(_decision(g.responses[a]), _decision(g.responses[b]))]
        if da is not None and db is not None
    ]
    return {
        "prompts": len(common),
        "exact": sum(g.responses[a].strip() == g.responses[b].strip() for g in common) / len(common),
        "word_f1": sum(word_f1(g.responses[a], g.responses[b]) for g in common) / len(common),
        "both_valid": sum(
            schema_check(g.task, g.responses[a])["compliant"] and schema_check(g.task, g.responses[b])["compliant"]
            for g in common
        )
        / len(common),
        "decision_agreement": (sum(da == db for da, db in decisions) / len(decisions)) if decisions else None,
        "decisions": len(decisions),
    }


def teacher_agreement(groups: list[TeacherGroup], selections: list[Selection] | None = None) -> dict:
    """How far the teachers agree: per teacher (responses, schema-valid rate, times selected), per teacher pair
    (exact agreement, word F1, both valid, has_principle agreement), overall and per task."""
    teachers = list(dict.fromkeys(t for g in groups for t in g.responses))
    tasks = list(dict.fromkeys(g.task or "(none)" for g in groups))
    picked = collections.Counter(s.teacher for s in selections or [])

    def section(gs):
        per_teacher = {}
        for t in teachers:
            answered = [g for g in gs if t in g.responses]
            per_teacher[t] = {
                "responses": len(answered),
                "valid": (sum(schema_check(g.task, g.responses[t])["compliant"] for g in answered) / len(answered))
                if answered
                else None,
            }
        pairs = {f"{a} vs {b}": _pair_stats(gs, a, b) for i, a in enumerate(teachers) for b in teachers[i + 1 :]}
        return {"prompts": len(gs), "teachers": per_teacher, "pairs": pairs}

    report = {
        "schema": "felix-teacher-agreement",
        "version": 1,
        "teachers": teachers,
        "tasks": tasks,
        "overall": section(groups),
        "per_task": {task: section([g for g in groups if (g.task or "(none)") == task]) for task in tasks},
    }
    if selections is not None:
        report["selection"] = {
            "selected": {t: picked.get(t, 0) for t in teachers},
            "no_valid_response": sum(not s.valid for s in selections),
            "per_task": {
                task: dict(collections.Counter(s.teacher for s in selections if (s.task or "(none)") == task))
                for task in tasks
            },
        }
    return report


def agreement_markdown(report: dict, plot_name: str | None = None) -> str:
    o = report["overall"]
    lines = [
        "# Teacher agreement",
        "",
        f"{o['prompts']} prompts, teachers: {', '.join(report['teachers'])}",
        "",
        "| teacher | responses | schema-valid | selected |",
        "|---|---|---|---|",
    ]
    sel = (report.get("selection") or {}).get("selected", {})
    for t, s in o["teachers"].items():
        valid = f"{100 * s['valid']:.0f}%" if s["valid"] is not None else "-"
        lines.append(f"| {t} | {s['responses']} | {valid} | {sel.get(t, '-')} |")

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    lines += [
        "",
        "| pair | task | prompts | exact | word F1 | both valid | has_principle agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for scope, sec in [("all", o)] + list(report["per_task"].items()):
        for pair, s in sec["pairs"].items():
            lines.append(
                f"| {pair} | {scope} | {s['prompts']} | {fmt(s['exact'])} | {fmt(s['word_f1'])} | "
                f"{fmt(s['both_valid'])} | {fmt(s['decision_agreement'])} |"
            )
    if "selection" in report:
        lines += ["", f"Prompts with no schema-valid teacher response: {report['selection']['no_valid_response']}."]
    if plot_name:
        lines += ["", f"![pairwise word F1]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_agreement_report(report: dict, out_dir, stem: str = AGREEMENT_STEM) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (pairwise word-F1 heatmap), each written atomically."""
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = report["teachers"]
    m = [
        [
            1.0
            if a == b
            else (report["overall"]["pairs"].get(f"{a} vs {b}") or report["overall"]["pairs"].get(f"{b} vs {a}"))[
                "word_f1"
            ]
            or 0.0
            for b in teachers
        ]
        for a in teachers
    ]
    fig, ax = plt.subplots(figsize=(1.2 * len(teachers) + 2, 1.0 * len(teachers) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(teachers)))
    ax.set_xticklabels(teachers)
    ax.set_yticks(range(len(teachers)))
    ax.set_yticklabels(teachers)
    for i in range(len(teachers)):
        for j in range(len(teachers)):
            ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", color="w" if m[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="word F1")
    ax.set_title("teacher agreement")
    fig.tight_layout()
    png = save_figure(fig, out / f"{stem}.png", dpi=100)
    plt.close(fig)
    return {
        "json": atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1)),
        "markdown": atomic_write_text(out / f"{stem}.md", agreement_markdown(report, png.name)),
        "plot": png,
    }
