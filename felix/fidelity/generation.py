"""Greedy generation from a logit source (llama.cpp's KV cache where it has one) and schema compliance of the
generations."""
from __future__ import annotations

import json

from felix.fidelity.probes import _TYPES, EncodedProbe


def greedy_generate(source, prompts: list[list[int]], budgets: list[int], stop_ids) -> list[list[int]]:
    """Greedy continuations of several prompts at once (batched), each recomputed over its last n_ctx tokens per
    step (a sliding window: the tiny presets' contexts are shorter than some records). A continuation stops at a
    token in `stop_ids` (not included) or after its budget of new tokens. A source with its own KV-cache
    ``greedy`` (llama.cpp) decodes each prompt there when prompt + budget fit its context (no window needed)."""
    if hasattr(source, "greedy") and all(len(p) + b <= source.n_ctx for p, b in zip(prompts, budgets)):
        return [source.greedy(list(p), b, set(stop_ids)) if b > 0 else [] for p, b in zip(prompts, budgets)]
    seqs, new = [list(p) for p in prompts], [[] for _ in prompts]
    active = [i for i, b in enumerate(budgets) if b > 0]
    while active:
        logits = source.logits([seqs[i][-source.n_ctx:] for i in active])
        still = []
        for i, z in zip(active, logits):
            nxt = int(z[-1].argmax())
            if nxt in stop_ids:
                continue
            seqs[i].append(nxt)
            new[i].append(nxt)
            if len(new[i]) < budgets[i]:
                still.append(i)
        active = still
    return new


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def check_compliance(text: str, schema: dict | None) -> dict:
    """Schema compliance of one generation: valid JSON (an object), required fields present, field types,
    enum values. Returns the four booleans, ``compliant`` (all four) and the problems found."""
    result = {"valid_json": False, "required_fields": False, "field_types": False, "enum_values": False,
              "compliant": False, "problems": []}
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
        ok = isinstance(value, _TYPES[type_name]) and not (type_name == "number" and isinstance(value, bool))
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


def compliance_run(source, encoded: list[EncodedProbe], tokenizer, max_new_tokens: int, progress=False,
                   desc="generating") -> list[dict]:
    """Greedy generations of the probes that carry a schema, each checked with check_compliance."""
    from tqdm import tqdm

    from felix.data import END

    stop = {tokenizer.eos_id, tokenizer.token_id(END)}
    todo = [e for e in encoded if e.probe.schema is not None]
    rows = []
    for s in tqdm(range(0, len(todo), 16), desc=desc, unit="batch", disable=not progress, leave=False):
        part = todo[s:s + 16]
        # budget: the expected continuation's length plus some slack, at most max_new_tokens
        outs = greedy_generate(source, [e.ids[:e.n_prompt] for e in part],
                               [min(max_new_tokens, len(e.targets) + 16) for e in part], stop)
        for e, new in zip(part, outs):
            text = tokenizer.decode(new)
            rows.append({"probe": e.probe.name, "text": text, **check_compliance(text, e.probe.schema)})
    return rows


def compliance_summary(rows: list[dict]) -> dict:
    keys = ("valid_json", "required_fields", "field_types", "enum_values", "compliant")
    return {"probes": len(rows), **{k: sum(r[k] for r in rows) for k in keys}}
