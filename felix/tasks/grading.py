"""Grading a task answer against its item: similarity measures and the graders (Likert 1-5).

* :func:`word_f1`, :func:`value_match`: how close an answer is to the reference (prose by word F1, JSON field by
  field).
* :class:`Grader` is the pluggable interface (``grade(item, output) -> Grade``); :class:`RuleGrader` is the
  deterministic rubric against the item's reference (format, content, the principle task's decision; its grade is the
  minimum of its criteria); :class:`LLMGrader` is the interface for a judge model (it renders the rubric prompt and
  parses the reply; the completion function comes from the caller).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from felix.tasks.compliance import schema_check
from felix.tasks.schemas import task_schema
from felix.tasks.suite import TaskEvalError, TaskItem

LIKERT_MIN, LIKERT_MAX = 1.0, 5.0


_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def words(text: str) -> list[str]:
    """The lower-cased words (and decimal numbers) of a text."""
    return _WORD.findall(str(text).lower())


def word_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two texts (1.0 for two empty texts)."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    if not wa or not wb:
        return 0.0
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


def likert(fraction: float) -> float:
    """A fraction in [0, 1] (clamped) on the Likert scale [LIKERT_MIN, LIKERT_MAX]."""
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
        if schema is not None or looks_json(item.reference):
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
                criteria["content"] = likert(value_match(got, want))
            if isinstance(want, dict) and "has_principle" in want:
                agree = isinstance(got, dict) and got.get("has_principle") is want["has_principle"]
                criteria["decision"] = 5.0 if agree else 1.0
        else:
            stripped = output.strip()
            criteria["format"] = 5.0 if check["compliant"] else (3.0 if stripped and stripped[0] not in "{[" else 1.0)
            criteria["content"] = likert(word_f1(output, item.reference))
        return Grade(min(criteria.values()), criteria, "; ".join(check["problems"]))


def looks_json(text: str) -> bool:
    """Whether `text` is a JSON object."""
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
            raise TaskEvalError(
                "LLMGrader needs a completion function (prompt str -> reply str); none can be called "
                "from here, so bring your own (an API client, a local model)"
            )
        self.complete, self.name, self.show_reference = complete, name, show_reference

    def prompt(self, item: TaskItem, output: str) -> str:
        ref = (
            f"Reference answer (for comparison):\n{item.reference}\n"
            if self.show_reference and item.reference is not None
            else ""
        )
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
