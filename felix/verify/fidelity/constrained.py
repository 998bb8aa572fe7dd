"""Constrained decoding, measured through the served path (`felix fidelity --constrained`).

Every probe with a schema whose prompt is in Felix's chat format is asked through felix.ship.serve's
``/v1/chat/completions`` twice at temperature 0 (greedy): once free, once with ``response_format`` of type
``json_schema`` carrying the probe's schema as JSON Schema (:func:`json_schema`), which llama-cpp-python turns into
a GBNF grammar that masks every token the schema does not allow. Both answers are checked for schema compliance
(felix.verify.fidelity.check_compliance) and graded against the probe's expected answer by felix.verify.task_eval's RuleGrader
(Likert 1-5), so the report shows whether the grammar or the model carries the structure: a model that already
complies gains nothing from the grammar (the answers are the same), and a grammar that fights the model's
distribution shows as compliant answers whose task score falls.
"""

from __future__ import annotations

import json

from tqdm import tqdm

from felix.model.chat import END, messages_from_prompt
from felix.tasks.grading import RuleGrader
from felix.tasks.suite import TaskItem
from felix.verify.fidelity.common import FidelityError
from felix.verify.fidelity.generation import check_compliance

_JSON_TYPES = {
    "string": "string",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "object": "object",
    "null": "null",
}


def json_schema(spec: dict, closed: bool = True) -> dict:
    """The JSON Schema of a probe schema (``{"required": {dotted.field: type}, "enums": {dotted.field: [values]}}``,
    felix.verify.fidelity.builtin_schemas): nested objects from the dotted paths, every listed field required, in the
    listed order (the grammar writes fields in this order, as the training data does), enum fields restricted to
    their values. `closed`: no fields beyond the listed ones (the built-in task shapes list them all)."""
    root: dict = {"type": "object", "properties": {}, "required": []}

    def node_at(path: list[str]) -> dict:
        node = root
        for part in path:
            child = node["properties"].setdefault(part, {"type": "object", "properties": {}, "required": []})
            if part not in node["required"]:
                node["required"].append(part)
            if child.get("type") != "object":
                raise FidelityError(f"schema field {'.'.join(path)} is a {child.get('type')}, yet has sub-fields")
            child.setdefault("properties", {})
            child.setdefault("required", [])
            node = child
        return node

    for dotted, type_name in spec.get("required", {}).items():
        if type_name not in _JSON_TYPES:
            raise FidelityError(f"schema field {dotted!r}: unknown type {type_name!r}")
        *parents, name = dotted.split(".")
        parent = node_at(parents)
        existing = parent["properties"].get(name)
        if existing is not None and existing.get("type") == "object" and type_name == "object":
            continue  # declared by a sub-field first
        parent["properties"][name] = {"type": _JSON_TYPES[type_name]}
        if type_name == "object":
            parent["properties"][name].update(properties={}, required=[])
        if name not in parent["required"]:
            parent["required"].append(name)
    for dotted, values in spec.get("enums", {}).items():
        *parents, name = dotted.split(".")
        prop = node_at(parents)["properties"].setdefault(name, {})
        prop["enum"] = list(values)

    def finish(node: dict) -> dict:
        if node.get("type") == "object":
            props = node.get("properties") or {}
            for child in props.values():
                finish(child)
            if not props:  # an object of any shape
                node.pop("properties", None)
                node.pop("required", None)
            elif closed:
                node["additionalProperties"] = False
        return node

    return finish(root)


def response_format(spec: dict, name: str = "task") -> dict:
    """The OpenAI ``response_format`` asking for `spec`'s JSON Schema."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema(spec), "strict": True}}


def _summary(rows: list[dict], key: str) -> dict:
    checked = [r[key] for r in rows]
    n = len(checked)
    fields = ("valid_json", "required_fields", "field_types", "enum_values", "compliant")
    out = {"probes": n, **{f: sum(c[f] for c in checked) for f in fields}}
    scores = [c["task_score"] for c in checked]
    out["task_score_mean"] = sum(scores) / n if n else float("nan")
    return out


def constrained_run(server, encoded, tokenizer, max_new_tokens: int, progress: bool = False) -> dict:
    """Each schema-carrying chat-format probe through `server` (felix.ship.serve.Server) free and grammar-constrained
    (greedy, same token budget as felix.verify.fidelity.compliance_run, capped by the context): compliance and RuleGrader
    task scores of both, and how many answers the grammar changed."""
    grader = RuleGrader()
    rows, skipped = [], []
    todo = [e for e in encoded if e.probe.schema is not None]
    for e in tqdm(todo, desc="served: free vs constrained", unit="probe", disable=not progress, leave=False):
        messages = messages_from_prompt(e.probe.prompt)
        budget = min(max_new_tokens, len(e.targets) + 16, server.n_ctx - e.n_prompt)
        if messages is None or budget < 1:
            skipped.append(
                {
                    "probe": e.probe.name,
                    "reason": "not a chat-format prompt"
                    if messages is None
                    else f"the prompt ({e.n_prompt} tokens) fills the context ({server.n_ctx})",
                }
            )
            continue
        reference = e.probe.expected.removesuffix(END)
        item = TaskItem(e.probe.name, e.probe.task or "", e.probe.prompt, reference)
        row = {"probe": e.probe.name, "max_tokens": budget}
        for key, extra in (("free", {}), ("constrained", {"response_format": response_format(e.probe.schema)})):
            text = server.chat_text(messages, temperature=0, max_tokens=budget, **extra)
            check = check_compliance(text, e.probe.schema)
            try:
                score = grader.grade(item, text).score
            except (ValueError, json.JSONDecodeError):  # a reference that is not JSON: no task score
                score = float("nan")
            row[key] = {"text": text, **check, "task_score": score}
        row["changed"] = row["free"]["text"] != row["constrained"]["text"]
        rows.append(row)
    return {
        "free": _summary(rows, "free"),
        "constrained": _summary(rows, "constrained"),
        "changed_by_grammar": sum(r["changed"] for r in rows),
        "skipped": skipped,
        "generations": rows,
    }
