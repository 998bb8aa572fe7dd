"""The built-in teachers: a task record's reference answer perturbed the ways teachers err, no download.

``exact`` answers with the record's own response (the strong teacher), ``noisy`` perturbs the content but keeps the
format (concepts dropped, numbers moved, words dropped, the refusal decision sometimes flipped) and ``sloppy`` is
noisy and breaks the format of half its answers (a field dropped or of the wrong type, the JSON cut short; prose run
on or chopped up). Deterministic per seed, teacher and prompt. felix.data.teachers groups them into teacher data;
felix.verify.task_eval compares them as systems.
"""

from __future__ import annotations

import hashlib
import json
import random

from felix.tasks.compliance import sentences
from felix.tasks.records import ACTORS

BUILTIN_TEACHERS = ("exact", "noisy", "sloppy")


def teacher_rng(*parts) -> random.Random:
    """A random generator seeded by a hash of `parts` (seed, teacher, prompt): the same draws on every machine."""
    return random.Random(int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big"))


def perturb_json(obj: dict, rng: random.Random) -> dict:
    """Content changes that keep the schema: concepts dropped / shuffled, numbers moved, text words dropped, the
    principle decision sometimes flipped."""
    out = json.loads(json.dumps(obj))
    if "has_principle" in out and rng.random() < 0.3:
        out["has_principle"] = not out["has_principle"]
    for key, v in list(out.items()):
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and rng.random() < 0.7:
            out[key] = round(min(1.0, max(0.0, v + rng.choice((-1, 1)) * rng.uniform(0.15, 0.4))), 2)
        elif isinstance(v, list) and v and rng.random() < 0.7:
            kept = v[:]
            rng.shuffle(kept)
            out[key] = kept[: max(1, len(kept) - 1 - rng.randint(0, 1))]
        elif isinstance(v, str) and len(v.split()) > 3 and rng.random() < 0.5:
            w = v.split()
            drop = rng.randrange(len(w))
            out[key] = " ".join(w[:drop] + w[drop + 1 :])
    return out


def perturb_prose(text: str, rng: random.Random) -> str:
    """Content changes to prose: a sentence dropped (not the first), actors' names swapped."""
    parts = sentences(text)
    if len(parts) > 2 and rng.random() < 0.6:
        del parts[rng.randrange(1, len(parts))]
    for i, s in enumerate(parts):
        if rng.random() < 0.4:
            names = [n for n in ACTORS if n in s]
            if names:
                parts[i] = s.replace(names[0], rng.choice(ACTORS))
    return " ".join(parts)


def noisy_response(record: dict, rng: random.Random) -> str:
    """The ``noisy`` teacher: the record's response with its content perturbed, its format kept."""
    try:
        obj = json.loads(record["response"])
    except json.JSONDecodeError:
        return perturb_prose(record["response"], rng)
    return json.dumps(perturb_json(obj, rng))


def sloppy_response(record: dict, rng: random.Random) -> str:
    """The ``sloppy`` teacher: noisy, and half of its answers break the format."""
    base = noisy_response(record, rng)
    if rng.random() >= 0.5:
        return base
    try:
        obj = json.loads(base)
    except json.JSONDecodeError:  # prose: one run-on sentence, or far too many
        words = base.replace(".", "").split()
        return " ".join(words) + "." if rng.random() < 0.5 else " ".join(f"{w.capitalize()}." for w in words[:9])
    how = rng.choice(("drop-field", "truncate", "wrong-type"))
    if how == "drop-field":
        obj.pop(rng.choice(sorted(obj)))
        return json.dumps(obj)
    if how == "wrong-type":
        key = rng.choice(sorted(obj))
        obj[key] = str(obj[key]) if not isinstance(obj[key], str) else [obj[key]]
        return json.dumps(obj)
    text = json.dumps(obj)
    return text[: max(1, int(len(text) * rng.uniform(0.4, 0.9)))]


# teacher -> (record, rng) -> response
BUILTIN_MAKERS = {"exact": lambda r, rng: r["response"], "noisy": noisy_response, "sloppy": sloppy_response}


def builtin_teacher_responses(records: list[dict], teacher: str, seed: int = 0) -> list[str]:
    """One built-in teacher's responses to task records (felix.tasks.records), deterministic per seed, teacher and
    prompt."""
    if teacher not in BUILTIN_MAKERS:
        raise ValueError(f"unknown built-in teacher {teacher!r}; choose from {', '.join(BUILTIN_TEACHERS)}")
    return [BUILTIN_MAKERS[teacher](r, teacher_rng(seed, teacher, r["prompt"])) for r in records]
