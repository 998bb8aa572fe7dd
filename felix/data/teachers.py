"""Teacher data for distillation: several teachers' responses per prompt, read, written and made.

* :func:`load_teacher_groups`: JSONL with several teachers per prompt, either one line per prompt
  ``{"prompt", "task"?, "responses": {teacher: response, ...}}`` or one line per teacher response
  ``{"prompt", "response", "teacher", "task"?}`` (felix.data.corpus.load_teacher_records' format), grouped by prompt. Any
  malformed line is an error naming ``path:line``; so is one teacher giving two different responses to a prompt.
* :func:`builtin_teacher_groups`: task records (felix.tasks.records) answered by the built-in teachers
  (felix.tasks.perturbations: exact, noisy, sloppy), no download.
* :func:`checkpoint_teacher`: a trained Felix checkpoint as a teacher (its greedy responses, felix.model.generate).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from felix.core.files import atomic_write_text, jsonl_lines, read_text
from felix.model.generate import greedy_responses
from felix.model.felix_lm import load_checkpoint
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses
from felix.tasks.records import TASKS, structured_records
from felix.model.tokenizer import Tokenizer


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
                if not (isinstance(resp, dict) and resp and all(_nonempty_str(k) and _nonempty_str(v)
                                                                for k, v in resp.items())):
                    problems.append(f"{where}: 'responses' must map teacher names to non-empty response strings")
                    continue
                pairs = list(resp.items())
            elif _nonempty_str(obj.get("response")) and _nonempty_str(obj.get("teacher")):
                pairs = [(obj["teacher"], obj["response"])]
            else:
                problems.append(f"{where}: expected 'responses' {{teacher: response}}, or non-empty strings "
                                f"'response' and 'teacher'")
                continue
            g = groups.setdefault(obj["prompt"], TeacherGroup(obj["prompt"], task, {}, {}))
            if task is not None and g.task is not None and task != g.task:
                problems.append(f"{where}: task {task!r} for a prompt that {next(iter(g.sources.values()))} gave "
                                f"task {g.task!r}")
                continue
            g.task = g.task or task
            for teacher, response in pairs:
                if teacher in g.responses and g.responses[teacher] != response:
                    problems.append(f"{where}: teacher {teacher!r} already gave a different response to this prompt "
                                    f"at {g.sources[teacher]}")
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
    lines = [json.dumps({"prompt": g.prompt, **({"task": g.task} if g.task else {}), "responses": g.responses})
             for g in groups]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def builtin_teacher_groups(n: int, seed: int = 0, tasks=TASKS,
                           teachers=BUILTIN_TEACHERS) -> list[TeacherGroup]:
    """`n` task records (felix.data.corpus.structured_records(n, seed, tasks)) with every built-in teacher's response."""
    records = structured_records(n, seed, tuple(tasks))
    by_teacher = {t: builtin_teacher_responses(records, t, seed) for t in teachers}
    groups: dict[str, TeacherGroup] = {}
    for i, r in enumerate(records):  # a repeated prompt (rare) keeps its first record
        groups.setdefault(r["prompt"], TeacherGroup(r["prompt"], r["task"], {t: by_teacher[t][i] for t in teachers},
                                                    {t: f"builtin:{seed}:{i}" for t in teachers}))
    return list(groups.values())


def checkpoint_teacher(name: str, checkpoint, groups: list[TeacherGroup], max_new_tokens: int = 192,
                       batch_size: int = 16, device="cpu", progress: bool = False) -> list[TeacherGroup]:
    """Add a trained Felix checkpoint as teacher `name`: its greedy responses to every group's prompt."""
    model, tok = load_checkpoint(checkpoint, device), Tokenizer.load(checkpoint)
    outs = greedy_responses(model, tok, [g.prompt for g in groups], max_new_tokens, batch_size, progress,
                            desc=f"teacher {name}")
    for g, out in zip(groups, outs):
        if name in g.responses:
            raise DistillError(f"teacher {name!r} already answers prompt {g.prompt[:60]!r}")
        if out.strip():
            g.responses[name] = out
            g.sources[name] = f"checkpoint:{checkpoint}"
    return groups
