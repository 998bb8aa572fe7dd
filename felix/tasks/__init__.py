"""The synthetic task world, one home: what the tasks are, what a good answer looks like, and how teachers err.

* ``records``       the task records (memory encoding, episode summary, principle abstraction with its refusal path,
  retrieval synthesis; the flip regimes' hedged and weighed principle tasks) and the vocabulary they are made of
* ``schemas``       the JSON tasks' output schemas (fields, types, enums)
* ``compliance``    whether an answer follows its task's format (check_compliance, schema_check)
* ``suite``         the task suite items a system is graded on
* ``grading``       similarity measures and the graders (rule-based rubric, the LLM-judge interface)
* ``perturbations`` the built-in teachers (exact, noisy, sloppy)

Nothing here imports torch or any other Felix stage: training data (felix.data.corpus), distillation (felix.train.distill,
felix.data.teachers), the fidelity harness and the task evaluation (felix.verify.task_eval) build on it.
"""

from __future__ import annotations

from felix.tasks.compliance import SYNTHESIS_SENTENCES, check_compliance, schema_check, sentences
from felix.tasks.grading import (
    LIKERT_MAX,
    LIKERT_MIN,
    LLM_RUBRIC,
    Grade,
    Grader,
    LLMGrader,
    RuleGrader,
    value_match,
    word_f1,
    words,
)
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses
from felix.tasks.records import (
    ACTORS,
    EVENTS,
    HEDGES,
    KINDS,
    MAKERS,
    MOODS,
    N_REVIEWERS,
    PRINCIPLE_HEDGED,
    PRINCIPLE_WEIGHED,
    REVIEW_WEIGHTS,
    SUBJECTS,
    TASKS,
    hedge_bayes_margin,
    hedged_probe_records,
    structured_records,
    weighed_evidence,
    weighed_probe_records,
)
from felix.tasks.schemas import JSON_TYPES, builtin_schemas, schema_from_example, task_schema
from felix.tasks.suite import SUITE_SEED, TaskEvalError, TaskItem, builtin_task_suite

__all__ = [
    "SYNTHESIS_SENTENCES",
    "check_compliance",
    "schema_check",
    "sentences",
    "LIKERT_MAX",
    "LIKERT_MIN",
    "LLM_RUBRIC",
    "Grade",
    "Grader",
    "LLMGrader",
    "RuleGrader",
    "value_match",
    "word_f1",
    "words",
    "BUILTIN_TEACHERS",
    "builtin_teacher_responses",
    "ACTORS",
    "EVENTS",
    "HEDGES",
    "KINDS",
    "MAKERS",
    "MOODS",
    "N_REVIEWERS",
    "PRINCIPLE_HEDGED",
    "PRINCIPLE_WEIGHED",
    "REVIEW_WEIGHTS",
    "SUBJECTS",
    "TASKS",
    "hedge_bayes_margin",
    "hedged_probe_records",
    "structured_records",
    "weighed_evidence",
    "weighed_probe_records",
    "JSON_TYPES",
    "builtin_schemas",
    "schema_from_example",
    "task_schema",
    "SUITE_SEED",
    "TaskEvalError",
    "TaskItem",
    "builtin_task_suite",
]
