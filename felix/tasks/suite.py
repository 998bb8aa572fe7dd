"""The task suite: the items a system's outputs are graded on (a prompt of a task and its reference answer).

:func:`builtin_task_suite` draws them from felix.tasks.records, a seed away from the trainer's records and the
fidelity probes; `felix eval-tasks` (felix.verify.task_eval) grades systems on it and `felix teacher-data --suite` answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

from felix.tasks.records import TASKS, structured_records

SUITE_SEED = 3_000_017  # the built-in suite: a seed away from the trainer's records and the fidelity probes


class TaskEvalError(ValueError):
    """Bad input to the task suite, its graders or the harness: unknown task, outputs that do not cover the suite, an
    unusable grader reply."""


@dataclass(frozen=True)
class TaskItem:
    """One suite item: a prompt of a task, and its reference answer (None when the suite has none)."""

    id: str
    task: str
    prompt: str
    reference: str | None = None


def builtin_task_suite(per_task: int = 8, seed: int = SUITE_SEED, tasks: tuple[str, ...] = TASKS) -> list[TaskItem]:
    """`per_task` items of each task from felix.tasks.records.structured_records (seed `seed`, apart from training
    data), with the record's response as the reference."""
    if per_task < 1:
        raise TaskEvalError(f"per_task must be >= 1, got {per_task}")
    records = structured_records(per_task * len(tasks), seed, tuple(tasks))
    counts: dict[str, int] = {}
    items = []
    for r in records:
        i = counts[r["task"]] = counts.get(r["task"], -1) + 1
        items.append(TaskItem(f"{r['task']}-{i}", r["task"], r["prompt"], r["response"]))
    return items
