"""Probes (prompt + expected continuation, optional output schema): the built-in sets, JSONL files, the
whitelist of protected tokens, and the probes encoded for scoring. The task schemas are felix.tasks.schemas'
(re-exported here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from felix.tasks import records as task_records
from felix.model import chat
from felix.verify.fidelity.common import FidelityError
from felix.core.files import jsonl_lines, read_text
from felix.tasks.schemas import JSON_TYPES, builtin_schemas, schema_from_example  # noqa: F401 (re-exported)
from felix.model.tokenizer import json_structure_whitelist


@dataclass
class Probe:
    """A prompt (raw text the model reads after BOS) and the continuation it is expected to produce.
    `schema` (optional) is checked on the greedy generation (see check_compliance)."""

    name: str
    prompt: str
    expected: str
    task: str | None = None
    schema: dict | None = None


def builtin_probes(n: int = 24, seed: int = 1_000_003) -> list[Probe]:
    """`n` structured-output and refusal probes from felix.data.corpus's record generator (a seed away from the
    trainer's): memory encoding, episode summaries, principles with ``has_principle: true`` and the refusal
    path ``has_principle: false``, in equal shares, as chat prompt + JSON response + END."""
    if n < 1:
        raise FidelityError(f"the number of built-in probes must be >= 1, got {n}")
    kinds = ("encoding", "episode", "principle-true", "principle-refusal")
    want = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    got: dict[str, list] = {k: [] for k in kinds}
    schemas = builtin_schemas()
    for r in task_records.structured_records(40 * n, seed, tasks=("encoding", "episode", "principle")):
        kind = r["task"]
        if kind == "principle":
            kind = "principle-true" if json.loads(r["response"])["has_principle"] else "principle-refusal"
        if len(got[kind]) < want[kind]:
            got[kind].append(
                Probe(
                    f"{kind}-{len(got[kind])}",
                    chat.chat_prompt(r["prompt"]),
                    r["response"] + chat.END,
                    r["task"],
                    schemas[r["task"]],
                )
            )
        if all(len(got[k]) == want[k] for k in kinds):
            break
    return [p for i in range(max(want.values())) for k in kinds if i < len(got[k]) for p in [got[k][i]]]


PROBE_SETS = ("builtin", "hedged", "weighed")


def hedged_probes(n: int = 48, seed: int = 2_000_003) -> list[Probe]:
    """The flip-regime probes: about `n` hedged principle-abstraction probes (felix.data.corpus.HEDGES), the same number
    per qualifier, each expecting its qualifier's majority (Bayes) answer. Probe names are
    ``hedged-<qualifier>-<i>``; the decision is the ``has_principle`` value."""
    if n < 1:
        raise FidelityError(f"the number of hedged probes must be >= 1, got {n}")
    per = max(1, round(n / len(task_records.HEDGES)))
    schema = builtin_schemas()["principle"]
    counts: dict[str, int] = {}
    out = []
    for r in task_records.hedged_probe_records(per, seed):
        i = counts[r["hedge"]] = counts.get(r["hedge"], -1) + 1
        out.append(
            Probe(
                f"hedged-{r['hedge']}-{i}", chat.chat_prompt(r["prompt"]), r["response"] + chat.END, r["task"], schema
            )
        )
    return out


def weighed_probes(n: int = 128, seed: int = 2_000_029) -> list[Probe]:
    """The second flip regime's probes: `n` weighed principle-abstraction probes (felix.data.corpus.REVIEW_WEIGHTS), each
    a distinct combination of reviewer qualifiers expecting the majority (Bayes) answer of its evidence. Probe
    names are ``weighed-<q1>.<q2>.<q3>-<i>``; the decision is the ``has_principle`` value."""
    try:
        records = task_records.weighed_probe_records(n, seed)
    except ValueError as e:
        raise FidelityError(str(e)) from None
    schema = builtin_schemas()["principle"]
    return [
        Probe(
            f"weighed-{'.'.join(r['qualifiers'])}-{i}",
            chat.chat_prompt(r["prompt"]),
            r["response"] + chat.END,
            r["task"],
            schema,
        )
        for i, r in enumerate(records)
    ]


def probe_set(name: str, n: int) -> list[Probe]:
    """A built-in probe set by name (PROBE_SETS): ``builtin`` (builtin_probes), ``hedged`` (hedged_probes) or
    ``weighed`` (weighed_probes)."""
    if name == "builtin":
        return builtin_probes(n)
    if name == "hedged":
        return hedged_probes(n)
    if name == "weighed":
        return weighed_probes(n)
    raise FidelityError(f"unknown probe set {name!r}; choose from {', '.join(PROBE_SETS)}")


def _check_schema_spec(schema, where: str) -> None:
    if (
        not isinstance(schema, dict)
        or not isinstance(schema.get("required", {}), dict)
        or not isinstance(schema.get("enums", {}), dict)
    ):
        raise FidelityError(
            f'{where}: \'schema\' must be an object {{"required": {{field: type}}, "enums": {{field: [values]}}}}'
        )
    bad = {k: v for k, v in schema.get("required", {}).items() if v not in JSON_TYPES}
    if bad:
        raise FidelityError(f"{where}: unknown schema type(s) {bad}; choose from {', '.join(JSON_TYPES)}")


def load_probes(path) -> list[Probe]:
    """Probes from a JSONL file: one object per line with string ``prompt`` and ``expected`` (optional
    ``name``, ``task``, ``schema``). An ``expected`` that is a JSON object (optionally followed by the END
    marker) gets a schema inferred from it. Every malformed line is reported with its line number."""
    path = Path(path)
    probes, bad = [], []
    for where, obj, problem in jsonl_lines(read_text(path, FidelityError, "probe file"), path):
        if problem:
            bad.append(f"{where}: {problem}")
            continue
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("prompt"), str)
            or not obj["prompt"]
            or not isinstance(obj.get("expected"), str)
            or not obj["expected"]
        ):
            bad.append(f"{where}: expected an object with non-empty strings 'prompt' and 'expected'")
            continue
        schema = obj.get("schema")
        try:
            if schema is not None:
                _check_schema_spec(schema, where)
        except FidelityError as e:
            bad.append(str(e))
            continue
        if schema is None:
            try:
                example = json.loads(obj["expected"].removesuffix(chat.END))
                schema = schema_from_example(example) if isinstance(example, dict) else None
            except json.JSONDecodeError:
                schema = None
        probes.append(
            Probe(
                str(obj.get("name", f"line-{where.rsplit(':', 1)[1]}")),
                obj["prompt"],
                obj["expected"],
                obj.get("task"),
                schema,
            )
        )
    if bad:
        raise FidelityError(f"{path}: {len(bad)} malformed probe line(s):\n  " + "\n  ".join(bad))
    if not probes:
        raise FidelityError(f"{path} holds no probes")
    return probes


@dataclass
class Whitelist:
    """The vocabulary mask, where it came from, and the entries that cannot be used (reported, not fatal)."""

    mask: torch.Tensor
    strings: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # user entries the tokenizer cannot produce
    unreachable: list[str] = field(default_factory=list)  # whitelisted vocab tokens the tokenizer never emits


def build_probe_whitelist(tokenizer, vocab_size: int, strings=(), tokens=()) -> Whitelist:
    """The training whitelist (felix.model.tokenizer.json_structure_whitelist: JSON structure + literals) plus the
    tokens of `strings` (field names, refusal phrases) and the single vocabulary tokens `tokens`. A token entry
    that is not exactly one token, and whitelisted vocabulary tokens the tokenizer never produces when encoding
    their own text (so no probe can expect them), are reported."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(json_structure_whitelist(tokenizer, strings=list(strings)), dtype=torch.long)] = True
    problems = []
    for s in strings:
        if not s:
            problems.append("whitelist string '' is empty: nothing to protect")
    for text in tokens:
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            mask[ids[0]] = True
        else:
            problems.append(
                f"whitelist token {text!r} is not one token of this tokenizer: it encodes to "
                f"{len(ids)} tokens {[tokenizer.decode([i]) for i in ids]}"
            )
    unreachable = []
    for i in mask.nonzero()[:, 0].tolist():
        text = tokenizer.decode([i])
        if tokenizer.encode(text) != [i]:
            unreachable.append(f"{i} {text!r} (encodes as {tokenizer.encode(text)})")
    return Whitelist(mask, list(strings), list(tokens), problems, unreachable)


@dataclass
class EncodedProbe:
    probe: Probe
    ids: list[int]  # bos + prompt + expected
    n_prompt: int  # bos + prompt tokens
    whitelisted: list[bool] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        return self.ids[self.n_prompt :]


def encode_probes(probes: list[Probe], tokenizer, whitelist: torch.Tensor) -> list[EncodedProbe]:
    out = []
    for p in probes:
        prompt = [tokenizer.bos_id, *tokenizer.encode(p.prompt)]
        expected = tokenizer.encode(p.expected)
        out.append(EncodedProbe(p, prompt + expected, len(prompt), [bool(whitelist[t]) for t in expected]))
    return out


def all_targets(encoded: list[EncodedProbe]) -> torch.Tensor:
    return torch.tensor([t for e in encoded for t in e.targets], dtype=torch.long)
