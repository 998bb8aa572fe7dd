"""The task-suite evaluation harness: student vs teachers vs the teacher ensemble, per task (`felix eval-tasks`).

The seed's headline comparison, on Felix's built-in task suite (felix.data's record shapes: memory encoding,
episode summarization, principle abstraction with its ``has_principle: false`` refusal path, retrieval synthesis):

* **Systems**: any number of named output lists over the same suite items -- a student checkpoint's greedy
  generations (:func:`felix.distill.greedy_responses`), teachers' responses (a teacher JSONL, the built-in
  synthetic teachers of :mod:`felix.distill`, or a bigger Felix checkpoint), and the **ensemble**: per item, the
  teacher output the graders score best (best-of by the rubric, ties to the first teacher listed).
* **Schema compliance** per output (:func:`schema_check`): the JSON tasks through felix.fidelity's checker
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
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from felix import data as felix_data
from felix.files import atomic_write_text, jsonable, save_figure

SCHEMA_NAME, SCHEMA_VERSION = "felix-task-eval", 1
LIKERT_MIN, LIKERT_MAX = 1.0, 5.0
SYNTHESIS_SENTENCES = (2, 5)  # the retrieval-synthesis task asks for 2-5 sentences (felix.data._synthesis_record)
SUITE_SEED = 3_000_017        # the built-in suite: a seed away from the trainer's records and the fidelity probes
ENSEMBLE = "ensemble"


class TaskEvalError(ValueError):
    """Bad input to the harness: unknown task, outputs that do not cover the suite, an unusable grader reply."""


# ============================================================================================ the suite
@dataclass(frozen=True)
class TaskItem:
    """One suite item: a prompt of a task, and its reference answer (None when the suite has none)."""

    id: str
    task: str
    prompt: str
    reference: str | None = None


def builtin_task_suite(per_task: int = 8, seed: int = SUITE_SEED,
                       tasks: tuple[str, ...] = felix_data.TASKS) -> list[TaskItem]:
    """`per_task` items of each task from felix.data.structured_records (seed `seed`, apart from training data),
    with the record's response as the reference."""
    if per_task < 1:
        raise TaskEvalError(f"per_task must be >= 1, got {per_task}")
    records = felix_data.structured_records(per_task * len(tasks), seed, tuple(tasks))
    counts: dict[str, int] = {}
    items = []
    for r in records:
        i = counts[r["task"]] = counts.get(r["task"], -1) + 1
        items.append(TaskItem(f"{r['task']}-{i}", r["task"], r["prompt"], r["response"]))
    return items


# =================================================================================== schema compliance
def task_schema(task: str | None) -> dict | None:
    """The JSON schema of a built-in JSON task (felix.fidelity.builtin_schemas), None for prose or unknown tasks."""
    from felix.fidelity import builtin_schemas

    return builtin_schemas().get(task) if task else None


def sentences(text: str) -> list[str]:
    """Sentences of a prose answer: pieces ending in . ! or ? (a trailing piece without one counts too)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def schema_check(task: str | None, text: str) -> dict:
    """Compliance of one output with its task's format: ``{"compliant": bool, "checked": bool, "problems": [...]}``.
    JSON tasks: felix.fidelity.check_compliance (valid JSON object, required fields, types, enums). Synthesis:
    prose (not JSON) of 2-5 sentences. Tasks without a known format are not checked (compliant, checked False)."""
    from felix.fidelity import check_compliance

    schema = task_schema(task)
    if schema is not None:
        r = check_compliance(text, schema)
        return {"compliant": r["compliant"], "checked": True, "problems": r["problems"]}
    if task == "synthesis":
        problems = []
        stripped = text.strip()
        if not stripped:
            problems.append("empty answer")
        elif stripped[0] in "{[":
            problems.append("JSON where prose was asked for")
        n = len(sentences(stripped))
        lo, hi = SYNTHESIS_SENTENCES
        if stripped and not lo <= n <= hi:
            problems.append(f"{n} sentences, want {lo}-{hi}")
        return {"compliant": not problems, "checked": True, "problems": problems}
    return {"compliant": True, "checked": False, "problems": []}


# ========================================================================================= similarity
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def word_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two texts (1.0 for two empty texts)."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    if not wa or not wb:
        return 0.0
    from collections import Counter

    common = sum((Counter(wa) & Counter(wb)).values())
    if not common:
        return 0.0
    p, r = common / len(wa), common / len(wb)
    return 2 * p * r / (p + r)


def value_match(got, want) -> float:
    """How well a JSON value matches the reference value, in [0, 1]: booleans exactly, numbers by closeness (within
    0.5 absolute), strings by word F1, lists as sets of their items' texts (F1), objects field by field."""
    if isinstance(want, bool) or isinstance(got, bool):
        return float(got is want)
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) or not math.isfinite(got):
            return 0.0
        return max(0.0, 1.0 - abs(float(got) - float(want)) / 0.5)
    if isinstance(want, str):
        return word_f1(got, want) if isinstance(got, str) else 0.0
    if isinstance(want, list):
        if not isinstance(got, list):
            return 0.0
        sa, sb = {json.dumps(x).lower() for x in got}, {json.dumps(x).lower() for x in want}
        if not sa and not sb:
            return 1.0
        common = len(sa & sb)
        return 0.0 if not common else 2 * common / (len(sa) + len(sb))
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return 0.0
        if not want:
            return float(not got)
        return sum(value_match(got.get(k), v) if k in got else 0.0 for k, v in want.items()) / len(want)
    return float(got == want)


# ============================================================================================ graders
@dataclass
class Grade:
    """A grader's verdict on one output: `score` on the Likert scale (1-5) and the per-criterion scores it is the
    minimum of (for an LLM grader: its one score)."""

    score: float
    criteria: dict = field(default_factory=dict)
    notes: str = ""


class Grader:
    """A pluggable grader: ``grade(item, output) -> Grade`` with a Likert score in [1, 5]. Subclasses set `name`."""

    name = "grader"

    def grade(self, item: TaskItem, output: str) -> Grade:
        raise NotImplementedError


def _likert(fraction: float) -> float:
    return LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) * min(1.0, max(0.0, fraction))


class RuleGrader(Grader):
    """Deterministic rubric against the item's reference answer. Criteria (each Likert 1-5); the grade is their
    minimum (a response is as good as its weakest criterion):

    * ``format``: 5 schema-compliant; 3 valid JSON with schema problems (JSON tasks) or prose with the wrong number
      of sentences (synthesis); 1 otherwise.
    * ``content``: 1 + 4 x the match with the reference (JSON: the mean over the reference's fields of
      :func:`value_match`; prose: word F1).
    * ``decision`` (principle abstraction only): 5 when ``has_principle`` agrees with the reference, 1 when not (the
      refusal path is the decision that matters).
    """

    name = "rule"

    def grade(self, item: TaskItem, output: str) -> Grade:
        if item.reference is None:
            raise TaskEvalError(f"the rule grader needs a reference answer; item {item.id} has none")
        check = schema_check(item.task, output)
        schema = task_schema(item.task)
        criteria = {}
        if schema is not None or _looks_json(item.reference):
            try:
                got = json.loads(output.strip())
            except json.JSONDecodeError:
                got = None
            want = json.loads(item.reference)
            if not isinstance(got, dict):
                criteria["format"] = 1.0
                criteria["content"] = 1.0
            else:
                criteria["format"] = 5.0 if check["compliant"] else 3.0
                criteria["content"] = _likert(value_match(got, want))
            if isinstance(want, dict) and "has_principle" in want:
                agree = isinstance(got, dict) and got.get("has_principle") is want["has_principle"]
                criteria["decision"] = 5.0 if agree else 1.0
        else:
            stripped = output.strip()
            criteria["format"] = 5.0 if check["compliant"] else (3.0 if stripped and stripped[0] not in "{[" else 1.0)
            criteria["content"] = _likert(word_f1(output, item.reference))
        return Grade(min(criteria.values()), criteria, "; ".join(check["problems"]))


def _looks_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, TypeError):
        return False


LLM_RUBRIC = """You are grading one answer of a small language model on a structured-output task.
Task kind: {task}
Prompt given to the model:
{prompt}
{reference_block}Answer to grade:
{output}

Rubric (Likert 1-5): 5 = follows the requested format exactly and every statement is supported by the prompt;
4 = format right, minor content gaps; 3 = format right but content partly wrong or unsupported, or small format
slips; 2 = major format problems or mostly wrong content; 1 = unusable (wrong format, wrong refusal decision, or
invented facts). Reply with one line: "Score: N" (N an integer 1-5), then one line of justification."""

_SCORE_LINE = re.compile(r"score\s*[:=]\s*([1-5](?:\.\d+)?)", re.IGNORECASE)


class LLMGrader(Grader):
    """The interface for a judge model: :meth:`prompt` renders the rubric (LLM_RUBRIC) for an item and output,
    `complete` (a callable str -> str supplied by the caller: an API client, a local llama.cpp model) answers it,
    and :meth:`parse` reads ``Score: N`` from the reply. Felix ships no judge and calls nothing itself."""

    def __init__(self, complete, name: str = "llm", show_reference: bool = True):
        if not callable(complete):
            raise TaskEvalError("LLMGrader needs a completion function (prompt str -> reply str); none can be called "
                                "from here, so bring your own (an API client, a local model)")
        self.complete, self.name, self.show_reference = complete, name, show_reference

    def prompt(self, item: TaskItem, output: str) -> str:
        ref = (f"Reference answer (for comparison):\n{item.reference}\n"
               if self.show_reference and item.reference is not None else "")
        return LLM_RUBRIC.format(task=item.task, prompt=item.prompt, reference_block=ref, output=output)

    def parse(self, reply: str) -> float:
        m = _SCORE_LINE.search(reply or "")
        if not m:
            raise TaskEvalError(f"grader {self.name!r} replied without a 'Score: N' line (N in 1-5): {reply!r:.200}")
        return float(m.group(1))

    def grade(self, item: TaskItem, output: str) -> Grade:
        reply = self.complete(self.prompt(item, output))
        score = self.parse(reply)
        return Grade(score, {"likert": score}, str(reply).strip().splitlines()[-1] if reply else "")


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
        rows.append({"item": item.id, "task": item.task, "output": out, **schema_check(item.task, out),
                     "grades": {k: asdict(v) for k, v in grades.items()},
                     "joint": min(v.score for v in grades.values())})
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
        per_task[task] = {"items": len(sub), "compliant": sum(r["compliant"] for r in sub),
                          "compliance": sum(r["compliant"] for r in sub) / len(sub),
                          "joint": sum(r["joint"] for r in sub) / len(sub),
                          "by_grader": {g: sum(r["grades"][g]["score"] for r in sub) / len(sub) for g in graders}}
    means = [per_task[t]["joint"] for t in tasks]
    return {"per_task": per_task, "mean_joint": sum(means) / len(means), "joint_min": min(means),
            "worst_task": tasks[means.index(min(means))],
            "compliance": sum(r["compliant"] for r in rows) / len(rows)}


def evaluate_systems(items: list[TaskItem], outputs: dict[str, list[str]], teachers: list[str],
                     graders: list[Grader] | None = None, meta: dict | None = None) -> dict:
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
    systems = {name: {"role": ("ensemble" if name == ENSEMBLE else "teacher" if name in teachers else "student"),
                      **summarize_rows(rows, tasks, names)} for name, rows in graded.items()}
    if wins is not None:
        systems[ENSEMBLE]["best_of_wins"] = wins
    return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "meta": meta or {}, "tasks": tasks,
            "graders": names, "teachers": list(teachers), "items": [asdict(i) for i in items],
            "systems": systems, "rows": graded,
            "aggregation": "joint score of an output = min over graders (a rule grader's score = min over its rubric "
                           "criteria); per task: mean joint score; per system: mean over tasks and joint_min = the "
                           "worst task's mean"}


# ============================================================================================ report
def markdown_report(report: dict, plot_name: str | None = None) -> str:
    tasks, systems = report["tasks"], report["systems"]
    lines = [f"# Task-suite evaluation", ""]
    meta = report.get("meta") or {}
    for k, v in meta.items():
        lines.append(f"* {k}: {v}")
    lines += [f"* graders: {', '.join(report['graders'])}; teachers: {', '.join(report['teachers']) or 'none'}",
              f"* aggregation: {report['aggregation']}", "",
              "## Rubric score (joint min over graders, Likert 1-5), per task", "",
              "| system | role | " + " | ".join(tasks) + " | mean | joint-min (worst task) |",
              "|---|---|" + "---|" * len(tasks) + "---|---|"]
    for name, s in systems.items():
        lines.append(f"| {name} | {s['role']} | " + " | ".join(f"{s['per_task'][t]['joint']:.2f}" for t in tasks)
                     + f" | {s['mean_joint']:.2f} | {s['joint_min']:.2f} ({s['worst_task']}) |")
    lines += ["", "## Schema compliance, per task (compliant / items)", "",
              "| system | " + " | ".join(tasks) + " | overall |", "|---|" + "---|" * len(tasks) + "---|"]
    for name, s in systems.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['per_task'][t]['compliant']}/{s['per_task'][t]['items']}"
                                                  for t in tasks) + f" | {100 * s['compliance']:.0f}% |")
    if ENSEMBLE in systems:
        wins = systems[ENSEMBLE]["best_of_wins"]
        lines += ["", "Ensemble = per item the best teacher output by the joint score; picked: "
                  + ", ".join(f"{t} {n}" for t, n in wins.items()) + "."]
    if plot_name:
        lines += ["", f"![rubric and compliance per task]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, systems = report["tasks"], report["systems"]
    names = list(systems)
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, (key, label, scale) in enumerate((("joint", "rubric score (joint min, 1-5)", 1.0),
                                             ("compliance", "schema compliance (%)", 100.0))):
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
    return {"json": atomic_write_text(out / f"{stem}.json", json.dumps(jsonable(report), indent=1)),
            "markdown": atomic_write_text(out / f"{stem}.md", markdown_report(report, png.name)),
            "plot": png}


# ================================================================================================== CLI
def teacher_outputs_from_groups(items: list[TaskItem], groups) -> dict[str, list[str]]:
    """Each teacher's response to every suite item, from felix.distill teacher groups matched by prompt. A teacher
    that misses suite prompts is refused (naming how many and one of them)."""
    by_prompt = {g.prompt: g for g in groups}
    teachers = list(dict.fromkeys(t for g in groups for t in g.responses))
    out = {}
    for t in teachers:
        missing = [i for i in items if i.prompt not in by_prompt or t not in by_prompt[i.prompt].responses]
        if missing:
            raise TaskEvalError(f"teacher {t!r} has no response to {len(missing)} of the {len(items)} suite prompts "
                                f"(e.g. {missing[0].id}); write suite teacher data with `felix teacher-data --suite`")
        out[t] = [by_prompt[i.prompt].responses[t] for i in items]
    return out


def cmd_eval_tasks(args) -> int:
    from felix import distill
    from felix.model import CheckpointError, load_checkpoint
    from felix.tokenizer import Tokenizer
    from felix.train import _device

    try:
        items = builtin_task_suite(args.per_task, args.seed)
        outputs: dict[str, list[str]] = {}
        teachers: list[str] = []
        device = _device(args.device)

        def generate(name, ckpt):
            if name in outputs:
                raise TaskEvalError(f"two systems are named {name!r}")
            model, tok = load_checkpoint(ckpt, device), Tokenizer.load(ckpt)
            outputs[name] = distill.greedy_responses(model, tok, [i.prompt for i in items], args.max_new_tokens,
                                                     args.batch_size, sys.stderr.isatty(), desc=name)

        for name, ckpt in args.student:
            generate(name, ckpt)
        if args.teacher_data:
            for name, outs in teacher_outputs_from_groups(items, distill.load_teacher_groups(args.teacher_data)).items():
                outputs[name] = outs
                teachers.append(name)
        if args.builtin_teachers or not (args.teacher_data or args.teacher_checkpoint):
            records = [{"prompt": i.prompt, "response": i.reference, "task": i.task} for i in items]
            for t in distill.BUILTIN_TEACHERS:
                outputs[t] = distill.builtin_teacher_responses(records, t, args.seed)
                teachers.append(t)
        for name, ckpt in args.teacher_checkpoint:
            generate(name, ckpt)
            teachers.append(name)
        meta = {"suite": f"built-in, {args.per_task} items per task, seed {args.seed}",
                "students": ", ".join(f"{n}={c}" for n, c in args.student) or "none",
                "max_new_tokens": args.max_new_tokens}
        report = evaluate_systems(items, outputs, teachers, [RuleGrader()], meta)
        files = write_task_report(report, args.out_dir)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"felix eval-tasks: error: {e}", file=sys.stderr)
        return 2
    for name, s in report["systems"].items():
        print(f"{name:12} {s['role']:8} rubric mean {s['mean_joint']:.2f}, joint-min {s['joint_min']:.2f} "
              f"({s['worst_task']}), compliance {100 * s['compliance']:.0f}%")
    print(f"report: {files['markdown']} (+ {files['json'].name}, {files['plot'].name})")
    return 0


def add_eval_tasks_parser(sub) -> None:
    from felix.distill import _named_path

    p = sub.add_parser("eval-tasks", help="task-suite report: student checkpoints vs teachers vs the teacher ensemble",
                       description="Per task of the built-in suite: schema compliance and the rubric score (rule "
                                   "grader, joint min) of each system's outputs; the ensemble is the best teacher "
                                   "output per item. Writes task-eval.json, .md and .png.")
    p.add_argument("--student", action="append", type=_named_path, default=[], metavar="NAME=DIR",
                   help="a checkpoint evaluated by its greedy generations (repeatable)")
    p.add_argument("--teacher-data", action="append", default=[], help="teacher JSONL answering the suite prompts "
                   "(felix teacher-data --suite); each teacher in it is a system")
    p.add_argument("--teacher-checkpoint", action="append", type=_named_path, default=[], metavar="NAME=DIR",
                   help="a trained Felix checkpoint as a teacher (repeatable)")
    p.add_argument("--builtin-teachers", action="store_true", help="add the built-in teachers (exact, noisy, sloppy; "
                   "the default when no other teacher is given)")
    p.add_argument("--per-task", type=int, default=8, help="suite items per task")
    p.add_argument("--seed", type=int, default=SUITE_SEED, help="suite seed")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="reports/task-eval")
    p.set_defaults(func=cmd_eval_tasks)
