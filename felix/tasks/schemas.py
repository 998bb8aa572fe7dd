"""The task world's output schemas: which fields a JSON task's answer has, their JSON types and enum values.

A schema is ``{"required": {dotted field path: JSON type name}, "enums": {dotted field path: [allowed values]}}``;
the type names are :data:`JSON_TYPES`' keys. :func:`builtin_schemas` gives the JSON tasks of felix.tasks.records
(synthesis is prose and has none), :func:`schema_from_example` infers one from an example answer.
"""

from __future__ import annotations

from felix.tasks.records import KINDS, MOODS

# JSON type name -> the Python types json.loads gives it ("number" excludes bool: see felix.tasks.compliance)
JSON_TYPES = {"string": str, "number": (int, float), "boolean": bool, "array": list, "object": dict, "null": type(None)}


def _field(required: dict, enums: dict | None = None) -> dict:
    return {"required": required, "enums": enums or {}}


def builtin_schemas() -> dict[str, dict]:
    """The seed task shapes of felix.tasks.records.structured_records: required fields (dotted paths into nested
    objects), their JSON types, and the enum-valued fields."""
    return {
        "encoding": _field(
            {
                "gist": "string",
                "summary": "string",
                "concepts": "array",
                "structured_concepts": "object",
                "structured_concepts.people": "array",
                "structured_concepts.systems": "array",
                "structured_concepts.actions": "array",
                "structured_concepts.kind": "string",
                "significance": "string",
                "salience": "number",
                "emotional_tone": "string",
            },
            {"structured_concepts.kind": list(KINDS), "emotional_tone": list(MOODS)},
        ),
        "episode": _field({"title": "string", "summary": "string", "concepts": "array", "salience": "number"}),
        "principle": _field(
            {
                "has_principle": "boolean",
                "title": "string",
                "principle": "string",
                "concepts": "array",
                "confidence": "number",
            }
        ),
    }


def task_schema(task: str | None) -> dict | None:
    """The JSON schema of a built-in JSON task, None for prose or unknown tasks."""
    return builtin_schemas().get(task) if task else None


def json_type_name(value) -> str:
    """The JSON type name (a key of JSON_TYPES) of a value json.loads returned."""
    return next(
        n for n, t in JSON_TYPES.items() if isinstance(value, t) and not (n == "number" and isinstance(value, bool))
    )


def schema_from_example(obj: dict) -> dict:
    """A schema whose required fields are the example object's top-level keys with their JSON types."""
    return {"required": {k: json_type_name(v) for k, v in obj.items()}, "enums": {}}
