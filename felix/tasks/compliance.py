"""Schema compliance of a task answer: is it what its task's format asks for?

:func:`check_compliance` checks a JSON answer against a schema (felix.tasks.schemas: valid JSON object, required
fields, field types, enum values); :func:`schema_check` checks any task's answer (the JSON tasks through
check_compliance, synthesis as prose of 2-5 sentences). The fidelity harness, the task-suite graders and the teacher
selection of distillation all use these.
"""

from __future__ import annotations

import json
import re

from felix.tasks.schemas import JSON_TYPES, task_schema

SYNTHESIS_SENTENCES = (2, 5)  # retrieval synthesis asks for 2-5 sentences (felix.tasks.records.synthesis_record)


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def check_compliance(text: str, schema: dict | None) -> dict:
    """Schema compliance of one generation: valid JSON (an object), required fields present, field types,
    enum values. Returns the four booleans, ``compliant`` (all four) and the problems found."""
    result = {
        "valid_json": False,
        "required_fields": False,
        "field_types": False,
        "enum_values": False,
        "compliant": False,
        "problems": [],
    }
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError as e:
        result["problems"].append(f"not valid JSON: {e.msg} at char {e.pos}")
        return result
    if not isinstance(obj, dict):
        result["problems"].append(f"JSON {type(obj).__name__}, not an object")
        return result
    result["valid_json"] = True
    schema = schema or {"required": {}, "enums": {}}
    present, typed = True, True
    for name, type_name in schema.get("required", {}).items():
        try:
            value = _lookup(obj, name)
        except KeyError:
            present = False
            result["problems"].append(f"missing field {name!r}")
            continue
        ok = isinstance(value, JSON_TYPES[type_name]) and not (type_name == "number" and isinstance(value, bool))
        if not ok:
            typed = False
            result["problems"].append(f"field {name!r} is {type(value).__name__}, want {type_name}")
    enums_ok = True
    for name, allowed in schema.get("enums", {}).items():
        try:
            value = _lookup(obj, name)
        except KeyError:
            continue  # already counted as missing
        if value not in allowed:
            enums_ok = False
            result["problems"].append(f"field {name!r} = {value!r} is not one of {allowed}")
    result.update(required_fields=present, field_types=present and typed, enum_values=present and enums_ok)
    result["compliant"] = present and typed and enums_ok
    return result


def sentences(text: str) -> list[str]:
    """Sentences of a prose answer: pieces ending in . ! or ? (a trailing piece without one counts too)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def schema_check(task: str | None, text: str) -> dict:
    """Compliance of one output with its task's format: ``{"compliant": bool, "checked": bool, "problems": [...]}``.
    JSON tasks: check_compliance (valid JSON object, required fields, types, enums). Synthesis:
    prose (not JSON) of 2-5 sentences. Tasks without a known format are not checked (compliant, checked False)."""
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
