"""RQ4 fidelity harness: which decisions of a Felix-LM checkpoint survive a given quantization, token by token.

`felix fidelity CHECKPOINT --quant rq4` feeds probes (prompt + expected continuation) through the reference
model and the quantized one and compares their logits at every expected token:

* **Whitelisted positions** (the expected token is a QUAIL-whitelisted token: JSON structure, the literals
  ``true``/``false``/``null`` -- ``has_principle: false`` is the refusal path -- and any strings/tokens the user
  adds): the *margin* (target logit minus the best other logit) before and after, the margin change, and
  whether the decision *flipped* (margin > 0 on one side and <= 0 on the other). *Margin survival* is the
  fraction of positions the reference decides correctly (margin > 0) that stay correct when quantized.
* **All positions**: KL divergence reference -> quantized (mean, median, p99, max), top-1 agreement and the
  change of the expected token's probability (delta-p), the statistics of ``llama-perplexity --kl-divergence``.
* **Per-tensor sensitivity**: one tensor quantized at a time, the rest exact; tensors ranked by the mean
  margin they cost at whitelisted positions, so a user sees which ones need more bits.
* **Schema compliance** of greedy generations (valid JSON, required fields, field types, enum values),
  reference vs quantized.

Two paths. *simulated*: the PyTorch model on weights that went through the exporter's per-tensor policy
(felix.quant_policy: roundtrip of every tensor through its GGUF type) -- any format. With
``sim_activations="runtime"`` (CLI ``--sim-activations runtime``) it also rounds activations as llama.cpp's CPU
matmuls do (Q8_0 blocks for 4-bit and 8-bit weights, f16 q/k/v: felix.activation_rounding), so it predicts
what the deployment computes, not only what its weights are. *runtime*: the exported GGUF files (f32
reference, quantized) in the runtime that serves them: stock llama.cpp (``llama`` arch) for the stock formats,
the Felix llama.cpp fork (``felix`` arch) for RQ4 (felix.llamacpp). When both paths run, the report says how
closely each simulation (exact and runtime activations) reproduces the runtime's logits (``agreement``,
``agreement_by_sim_activations``); tests/test_fidelity_llamacpp.py and tests/test_fork_llamacpp.py bound it.

Probes are scored in windows of the model's context (max_seq_len): a probe longer than that is scored in
overlapping windows, each expected token seeing at least half a window of context, identically on both paths.

Outputs: a JSON report (``schema: felix-fidelity-report``, ``schema_version``), a Markdown report and PNG
plots (margin scatter with the flip region marked, margin-change histogram, sensitivity bars). Gate
thresholds make `felix fidelity` exit non-zero when crossed.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SCHEMA_NAME = "felix-fidelity-report"
SCHEMA_VERSION = 2  # 2: summary.margin.change_quantiles, summary.minority, probe sets
PATHS = ("simulated", "runtime")
SIM_ACTIVATIONS = ("exact", "runtime")   # simulated path: exact activations, or rounded as llama.cpp does


def runtime_of(quant: str) -> str:
    """The llama.cpp runtime an export to `quant` runs in: "fork" for the fork-only formats (RQ4), else "stock"."""
    from felix.formats import FORMATS

    return FORMATS[quant].runtime if quant in FORMATS else "stock"


def arch_of(quant: str) -> str:
    """The GGUF architecture the runtime path exports to: the fork's ``felix`` arch for fork-only formats."""
    from felix import fork

    return fork.ARCH if runtime_of(quant) == "fork" else "llama"


class FidelityError(ValueError):
    """Input the harness cannot use: malformed probes, a tokenizer that does not fit the checkpoint, bad logits."""


# =========================================================================================== metrics
def _check_logits(ref: torch.Tensor, quant: torch.Tensor | None = None, targets: torch.Tensor | None = None):
    for name, t in (("reference logits", ref), ("quantized logits", quant)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise FidelityError(f"{name} must be a 2-D float tensor [positions, vocab], got "
                                f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}".rstrip())
        if t.shape[1] < 2:
            raise FidelityError(f"{name} have a vocabulary of {t.shape[1]}: a margin needs at least 2 tokens")
        if not torch.isfinite(t).all():
            raise FidelityError(f"{name} contain NaN or Inf")
    if quant is not None and quant.shape != ref.shape:
        raise FidelityError(f"reference logits {tuple(ref.shape)} and quantized logits {tuple(quant.shape)} differ "
                            f"in shape")
    if targets is not None:
        if targets.dim() != 1 or targets.shape[0] != ref.shape[0] or targets.dtype not in (torch.int64, torch.int32):
            raise FidelityError(f"targets must be integer token ids [{ref.shape[0]}], got {tuple(targets.shape)} "
                                f"{targets.dtype}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= ref.shape[1]):
            raise FidelityError(f"target ids must lie in 0..{ref.shape[1] - 1}, got {int(targets.min())}.."
                                f"{int(targets.max())}")


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit, per position (float64). > 0: the target is the strict top-1;
    a tie is 0 (undecided), as in the QUAIL hinge."""
    _check_logits(logits, targets=targets)
    z = logits.double()
    target = z.gather(1, targets.long()[:, None])[:, 0]
    other = z.scatter(1, targets.long()[:, None], float("-inf")).max(1).values
    return target - other


def kl_divergence(ref_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_quant) per position, in nats (float64): sum p_ref (log p_ref - log p_quant)."""
    _check_logits(ref_logits, quant_logits)
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(quant_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


@dataclass
class PositionStats:
    """Per-position comparison of reference and quantized logits (all tensors [positions])."""

    targets: torch.Tensor
    whitelisted: torch.Tensor     # bool: the expected token is whitelisted
    ref_margin: torch.Tensor
    quant_margin: torch.Tensor
    kl: torch.Tensor
    top1_agree: torch.Tensor      # bool: same argmax
    delta_p: torch.Tensor         # p_quant(expected) - p_ref(expected)
    # the reference's best token other than the expected one (the minority option when the reference is right)
    runner_up: torch.Tensor | None = None
    runner_up_whitelisted: torch.Tensor | None = None   # bool
    runner_up_logp_ref: torch.Tensor | None = None      # log p_ref(runner-up)
    runner_up_logp_quant: torch.Tensor | None = None    # log p_quant(runner-up)

    @property
    def flipped(self) -> torch.Tensor:
        """The decision changed sides: margin > 0 on one side, <= 0 on the other."""
        return (self.ref_margin > 0) != (self.quant_margin > 0)

    @property
    def lost(self) -> torch.Tensor:
        """The reference decided correctly and the quantized model does not."""
        return (self.ref_margin > 0) & (self.quant_margin <= 0)


def compare_logits(ref_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor,
                   whitelist: torch.Tensor) -> PositionStats:
    """Every metric of the module docstring, per position. `whitelist`: a bool mask over the vocabulary."""
    _check_logits(ref_logits, quant_logits, targets)
    if whitelist.dtype != torch.bool or whitelist.dim() != 1 or whitelist.numel() < ref_logits.shape[1]:
        raise FidelityError(f"whitelist must be a bool mask over the vocabulary ({ref_logits.shape[1]}), got "
                            f"{tuple(whitelist.shape)} {whitelist.dtype}")
    t = targets.long()
    lp_ref, lp_q = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(quant_logits.double(), -1)
    p_ref, p_q = lp_ref.gather(1, t[:, None])[:, 0].exp(), lp_q.gather(1, t[:, None])[:, 0].exp()
    ru = ref_logits.double().scatter(1, t[:, None], float("-inf")).argmax(-1)
    return PositionStats(targets=t, whitelisted=whitelist[t], ref_margin=margins(ref_logits, t),
                         quant_margin=margins(quant_logits, t), kl=kl_divergence(ref_logits, quant_logits),
                         top1_agree=ref_logits.argmax(-1) == quant_logits.argmax(-1), delta_p=p_q - p_ref,
                         runner_up=ru, runner_up_whitelisted=whitelist[ru],
                         runner_up_logp_ref=lp_ref.gather(1, ru[:, None])[:, 0],
                         runner_up_logp_quant=lp_q.gather(1, ru[:, None])[:, 0])


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


MINORITY_BUCKETS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5))  # p_ref of the minority option


def minority_summary(stats: PositionStats) -> dict:
    """p(whitelisted token) where it is the minority option: at whitelisted positions the reference decides
    correctly, its runner-up token when that is whitelisted too (e.g. the refusal ``false`` against the expected
    ``true``). Per bucket of the runner-up's reference probability: count, median p_ref, and the log-ratio
    log p_quant / p_ref of the runner-up (mean, p01, p99): > 0 means quantization made the minority option more
    likely."""
    if stats.runner_up is None:
        return {}
    sel = stats.whitelisted & stats.runner_up_whitelisted & (stats.ref_margin > 0)
    p_ref = stats.runner_up_logp_ref[sel].exp()
    ratio = (stats.runner_up_logp_quant - stats.runner_up_logp_ref)[sel]
    out = {}
    for lo, hi in MINORITY_BUCKETS:
        b = (p_ref >= lo) & (p_ref < hi)
        out[f"{lo:g}-{hi:g}"] = {"count": int(b.sum()), "p_ref_median": _quantile(p_ref[b], 0.5),
                                 "log_ratio_mean": float(ratio[b].mean()) if b.any() else float("nan"),
                                 "log_ratio_p01": _quantile(ratio[b], 0.01),
                                 "log_ratio_p99": _quantile(ratio[b], 0.99)}
    return out


def summarize(stats: PositionStats, low_margin: float | None = None) -> dict:
    """The report's summary numbers (plain floats/ints; NaN where a set is empty). `low_margin` (default
    felix.quail.DEFAULT_MARGIN, the QUAIL hinge's margin): reference-correct whitelisted positions with a margin
    below it are also counted on their own: they are the decisions a 4-bit rounding can plausibly flip.
    ``margin.change_quantiles`` (felix.quail.NOISE_QUANTILES) is the measured margin noise that
    ``felix train --margin-from`` calibrates from."""
    from felix.quail import DEFAULT_MARGIN, NOISE_QUANTILES, _quantile_key

    low_margin = DEFAULT_MARGIN if low_margin is None else low_margin
    w = stats.whitelisted
    ref_m, q_m = stats.ref_margin[w], stats.quant_margin[w]
    change = q_m - ref_m
    correct = ref_m > 0
    n_w = int(w.sum())
    low = correct & (ref_m < low_margin)
    mean = lambda x: float(x.double().mean()) if x.numel() else float("nan")  # noqa: E731
    return {
        "positions": int(stats.targets.numel()),
        "whitelisted_positions": n_w,
        "margin": {
            "reference_correct": int(correct.sum()),
            "survived": int((correct & (q_m > 0)).sum()),
            "survival": float((correct & (q_m > 0)).sum() / correct.sum()) if correct.any() else float("nan"),
            "flips": int(stats.flipped[w].sum()),
            "lost": int(stats.lost[w].sum()),
            "gained": int(((ref_m <= 0) & (q_m > 0)).sum()),
            "reference_mean": mean(ref_m), "quantized_mean": mean(q_m),
            "reference_min_correct": float(ref_m[correct].min()) if correct.any() else float("nan"),
            "change_mean": mean(change), "change_p01": _quantile(change, 0.01), "change_min":
                float(change.min()) if n_w else float("nan"),
            "change_quantiles": {_quantile_key(q): _quantile(change, q) for q in NOISE_QUANTILES},
            "change_abs_max": float(change.abs().max()) if n_w else float("nan"),
            "low_threshold": low_margin, "low_reference_correct": int(low.sum()),
            "low_survived": int((low & (q_m > 0)).sum()),
        },
        "kl": {"mean": mean(stats.kl), "median": _quantile(stats.kl, 0.5), "p99": _quantile(stats.kl, 0.99),
               "max": float(stats.kl.max()) if stats.kl.numel() else float("nan")},
        "minority": minority_summary(stats),
        "kl_whitelisted_mean": mean(stats.kl[w]),
        "top1_agreement": mean(stats.top1_agree.double()),
        "delta_p": {"mean": mean(stats.delta_p), "rms": math.sqrt(mean(stats.delta_p.pow(2))) if stats.delta_p.numel()
                    else float("nan"), "p01": _quantile(stats.delta_p, 0.01), "p99": _quantile(stats.delta_p, 0.99),
                    "min": float(stats.delta_p.min()) if stats.delta_p.numel() else float("nan")},
    }


# ============================================================================================ probes
@dataclass
class Probe:
    """A prompt (raw text the model reads after BOS) and the continuation it is expected to produce.
    `schema` (optional) is checked on the greedy generation (see check_compliance)."""

    name: str
    prompt: str
    expected: str
    task: str | None = None
    schema: dict | None = None


def _field(required: dict, enums: dict | None = None) -> dict:
    return {"required": required, "enums": enums or {}}


def builtin_schemas() -> dict[str, dict]:
    """The seed task shapes of felix.data.structured_records: required fields (dotted paths into nested
    objects), their JSON types, and the enum-valued fields."""
    from felix.data import _KINDS, _MOODS

    return {
        "encoding": _field({"gist": "string", "summary": "string", "concepts": "array",
                            "structured_concepts": "object", "structured_concepts.people": "array",
                            "structured_concepts.systems": "array", "structured_concepts.actions": "array",
                            "structured_concepts.kind": "string", "significance": "string", "salience": "number",
                            "emotional_tone": "string"},
                           {"structured_concepts.kind": list(_KINDS), "emotional_tone": list(_MOODS)}),
        "episode": _field({"title": "string", "summary": "string", "concepts": "array", "salience": "number"}),
        "principle": _field({"has_principle": "boolean", "title": "string", "principle": "string",
                             "concepts": "array", "confidence": "number"}),
    }


def builtin_probes(n: int = 24, seed: int = 1_000_003) -> list[Probe]:
    """`n` structured-output and refusal probes from felix.data's record generator (a seed away from the
    trainer's): memory encoding, episode summaries, principles with ``has_principle: true`` and the refusal
    path ``has_principle: false``, in equal shares, as chat prompt + JSON response + END."""
    from felix import data

    if n < 1:
        raise FidelityError(f"the number of built-in probes must be >= 1, got {n}")
    kinds = ("encoding", "episode", "principle-true", "principle-refusal")
    want = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    got: dict[str, list] = {k: [] for k in kinds}
    schemas = builtin_schemas()
    for r in data.structured_records(40 * n, seed, tasks=("encoding", "episode", "principle")):
        kind = r["task"]
        if kind == "principle":
            kind = "principle-true" if json.loads(r["response"])["has_principle"] else "principle-refusal"
        if len(got[kind]) < want[kind]:
            got[kind].append(Probe(f"{kind}-{len(got[kind])}", data.chat_prompt(r["prompt"]),
                                   r["response"] + data.END, r["task"], schemas[r["task"]]))
        if all(len(got[k]) == want[k] for k in kinds):
            break
    return [p for i in range(max(want.values())) for k in kinds if i < len(got[k]) for p in [got[k][i]]]


PROBE_SETS = ("builtin", "hedged", "weighed")


def hedged_probes(n: int = 48, seed: int = 2_000_003) -> list[Probe]:
    """The flip-regime probes: about `n` hedged principle-abstraction probes (felix.data.HEDGES), the same number
    per qualifier, each expecting its qualifier's majority (Bayes) answer. Probe names are
    ``hedged-<qualifier>-<i>``; the decision is the ``has_principle`` value."""
    from felix import data

    if n < 1:
        raise FidelityError(f"the number of hedged probes must be >= 1, got {n}")
    per = max(1, round(n / len(data.HEDGES)))
    schema = builtin_schemas()["principle"]
    counts: dict[str, int] = {}
    out = []
    for r in data.hedged_probe_records(per, seed):
        i = counts[r["hedge"]] = counts.get(r["hedge"], -1) + 1
        out.append(Probe(f"hedged-{r['hedge']}-{i}", data.chat_prompt(r["prompt"]), r["response"] + data.END,
                         r["task"], schema))
    return out


def weighed_probes(n: int = 128, seed: int = 2_000_029) -> list[Probe]:
    """The second flip regime's probes: `n` weighed principle-abstraction probes (felix.data.REVIEW_WEIGHTS), each
    a distinct combination of reviewer qualifiers expecting the majority (Bayes) answer of its evidence. Probe
    names are ``weighed-<q1>.<q2>.<q3>-<i>``; the decision is the ``has_principle`` value."""
    from felix import data

    try:
        records = data.weighed_probe_records(n, seed)
    except ValueError as e:
        raise FidelityError(str(e)) from None
    schema = builtin_schemas()["principle"]
    return [Probe(f"weighed-{'.'.join(r['qualifiers'])}-{i}", data.chat_prompt(r["prompt"]), r["response"] + data.END,
                  r["task"], schema) for i, r in enumerate(records)]


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


_TYPES = {"string": str, "number": (int, float), "boolean": bool, "array": list, "object": dict, "null": type(None)}


def _check_schema_spec(schema, where: str) -> None:
    if not isinstance(schema, dict) or not isinstance(schema.get("required", {}), dict) \
            or not isinstance(schema.get("enums", {}), dict):
        raise FidelityError(f"{where}: 'schema' must be an object {{\"required\": {{field: type}}, \"enums\": "
                            f"{{field: [values]}}}}")
    bad = {k: v for k, v in schema.get("required", {}).items() if v not in _TYPES}
    if bad:
        raise FidelityError(f"{where}: unknown schema type(s) {bad}; choose from {', '.join(_TYPES)}")


def schema_from_example(obj: dict) -> dict:
    """A schema whose required fields are the example object's top-level keys with their JSON types."""
    def type_name(v):
        return next(n for n, t in _TYPES.items() if isinstance(v, t) and not (n == "number" and isinstance(v, bool)))
    return {"required": {k: type_name(v) for k, v in obj.items()}, "enums": {}}


def load_probes(path) -> list[Probe]:
    """Probes from a JSONL file: one object per line with string ``prompt`` and ``expected`` (optional
    ``name``, ``task``, ``schema``). An ``expected`` that is a JSON object (optionally followed by the END
    marker) gets a schema inferred from it. Every malformed line is reported with its line number."""
    from felix.data import END

    path = Path(path)
    if not path.is_file():
        raise FidelityError(f"probe file {path} does not exist")
    probes, bad = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"] \
                or not isinstance(obj.get("expected"), str) or not obj["expected"]:
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
                example = json.loads(obj["expected"].removesuffix(END))
                schema = schema_from_example(example) if isinstance(example, dict) else None
            except json.JSONDecodeError:
                schema = None
        probes.append(Probe(str(obj.get("name", f"line-{lineno}")), obj["prompt"], obj["expected"],
                            obj.get("task"), schema))
    if bad:
        raise FidelityError(f"{path}: {len(bad)} malformed probe line(s):\n  " + "\n  ".join(bad))
    if not probes:
        raise FidelityError(f"{path} holds no probes")
    return probes


# ========================================================================================= whitelist
@dataclass
class Whitelist:
    """The vocabulary mask, where it came from, and the entries that cannot be used (reported, not fatal)."""

    mask: torch.Tensor
    strings: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)      # user entries the tokenizer cannot produce
    unreachable: list[str] = field(default_factory=list)   # whitelisted vocab tokens the tokenizer never emits


def build_probe_whitelist(tokenizer, vocab_size: int, strings=(), tokens=()) -> Whitelist:
    """The training whitelist (felix.tokenizer.json_structure_whitelist: JSON structure + literals) plus the
    tokens of `strings` (field names, refusal phrases) and the single vocabulary tokens `tokens`. A token entry
    that is not exactly one token, and whitelisted vocabulary tokens the tokenizer never produces when encoding
    their own text (so no probe can expect them), are reported."""
    from felix.tokenizer import json_structure_whitelist

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
            problems.append(f"whitelist token {text!r} is not one token of this tokenizer: it encodes to "
                            f"{len(ids)} tokens {[tokenizer.decode([i]) for i in ids]}")
    unreachable = []
    for i in mask.nonzero()[:, 0].tolist():
        text = tokenizer.decode([i])
        if tokenizer.encode(text) != [i]:
            unreachable.append(f"{i} {text!r} (encodes as {tokenizer.encode(text)})")
    return Whitelist(mask, list(strings), list(tokens), problems, unreachable)


# ===================================================================================== logit sources
class TorchSource:
    """Logits of a FelixLM (any weights) for a batch of token-id sequences, each <= the context window."""

    def __init__(self, model, batch_size: int = 16):
        self.model, self.batch_size = model.eval(), batch_size
        self.n_ctx, self.n_vocab = model.cfg.max_seq_len, model.cfg.vocab_size

    @torch.no_grad()
    def logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            width = max(len(x) for x in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, x in enumerate(chunk):  # right padding: causal attention keeps it out of real positions
                batch[i, :len(x)] = torch.tensor(x)
            z = self.model(batch).float()
            out += [z[i, :len(x)].clone() for i, x in enumerate(chunk)]
        return out


class LlamaCppSource:
    """Logits from a GGUF file in llama.cpp (felix.llamacpp over llama-cpp-python), one sequence at a time."""

    def __init__(self, gguf_path, n_ctx: int):
        from felix.llamacpp import LlamaCppModel

        self.runtime = LlamaCppModel(gguf_path, n_ctx=n_ctx)
        self.n_ctx, self.n_vocab = n_ctx, self.runtime.n_vocab

    def logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        return [torch.from_numpy(self.runtime.logits(x)) for x in seqs]

    def greedy(self, prompt: list[int], budget: int, stop_ids) -> list[int]:
        """Greedy continuation on llama.cpp's KV cache (prompt evaluated once), the stop token not included."""
        out = self.runtime.greedy(prompt, budget, stop=sorted(stop_ids))
        return out[:-1] if out and out[-1] in stop_ids else out

    def close(self):
        self.runtime.close()


def windows(length: int, n_ctx: int) -> list[tuple[int, int]]:
    """Windows [start, end) covering a sequence of `length` tokens so that every target t >= 1 (predicted
    from tokens < t) is scored once, from a window giving it at least n_ctx // 2 tokens of context (or all of
    them when t < n_ctx)."""
    if n_ctx < 2:
        raise FidelityError(f"context window {n_ctx} is too small")
    out, end = [(0, min(length, n_ctx))], min(length, n_ctx)
    while end < length:
        start = end - n_ctx // 2
        out.append((start, min(start + n_ctx, length)))
        end = out[-1][1]
    return out


@dataclass
class EncodedProbe:
    probe: Probe
    ids: list[int]          # bos + prompt + expected
    n_prompt: int           # bos + prompt tokens
    whitelisted: list[bool] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        return self.ids[self.n_prompt:]


def encode_probes(probes: list[Probe], tokenizer, whitelist: torch.Tensor) -> list[EncodedProbe]:
    out = []
    for p in probes:
        prompt = [tokenizer.bos_id, *tokenizer.encode(p.prompt)]
        expected = tokenizer.encode(p.expected)
        out.append(EncodedProbe(p, prompt + expected, len(prompt), [bool(whitelist[t]) for t in expected]))
    return out


def score_probes(source, encoded: list[EncodedProbe], progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Logits predicting every expected token of every probe, concatenated in probe order: [positions, vocab]."""
    jobs = []  # (probe index, window start, first target scored, end)
    for k, e in enumerate(encoded):
        scored = e.n_prompt
        for start, end in windows(len(e.ids), source.n_ctx):
            lo = max(scored, start + 1)
            if lo < end:
                jobs.append((k, start, lo, end))
                scored = end
    from tqdm import tqdm

    chunks: dict[int, list] = {k: [] for k in range(len(encoded))}
    step = 16
    for s in tqdm(range(0, len(jobs), step), desc=desc, unit="batch", disable=not progress, leave=False):
        part = jobs[s:s + step]
        logits = source.logits([encoded[k].ids[start:end] for k, start, _, end in part])
        for (k, start, lo, end), z in zip(part, logits):
            chunks[k].append(z[lo - 1 - start: end - 1 - start])  # logits at t-1 predict target t
    return torch.cat([z for k in range(len(encoded)) for z in chunks[k]])


def all_targets(encoded: list[EncodedProbe]) -> torch.Tensor:
    return torch.tensor([t for e in encoded for t in e.targets], dtype=torch.long)


# ====================================================================================== generation
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


# ==================================================================================== the harness
def load_for_fidelity(checkpoint, tokenizer_path=None):
    """(model, tokenizer) from a checkpoint directory; the tokenizer must fit the model's vocabulary."""
    from felix.model import load_checkpoint
    from felix.tokenizer import Tokenizer

    model = load_checkpoint(checkpoint)
    tok = Tokenizer.load(tokenizer_path or checkpoint)
    if tok.vocab_size != model.cfg.vocab_size:
        raise FidelityError(f"checkpoint/tokenizer mismatch: the tokenizer "
                            f"({tokenizer_path or Path(checkpoint) / 'tokenizer.json'}) has {tok.vocab_size} tokens, "
                            f"the model's vocabulary is {model.cfg.vocab_size}")
    return model, tok


def quantized_state(state: dict, quant: str, embedding_type=None, only: str | None = None, qat=None):
    """(state dict after the export policy's roundtrip, the policy's choices). `only`: quantize just that
    tensor (per-tensor sensitivity), keep the rest exact. `qat` (felix.qat.QATConfig of a quantization-aware
    checkpoint): its tensors go through the codec its forward used, as the exporter writes them."""
    from felix import qat as felix_qat
    from felix.quant_policy import plan_tensor_types, roundtrip

    plan = plan_tensor_types({k: tuple(v.shape) for k, v in state.items()}, quant, embedding_type)
    out = dict(state)
    for c in plan:
        if c.type != "f32" and (only is None or c.name == only):
            if qat is not None and qat.tensor_types.get(c.name) == c.type:
                out[c.name] = felix_qat.fake_quant(state[c.name].float(), c.type, qat.mode)
            else:
                out[c.name] = roundtrip(state[c.name].float(), c.type)
    return out, plan


def _with_state(model, state):
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state, strict=True)
    return m.eval()


def sensitivity(model, encoded, quant, embedding_type, whitelist, ref_logits, progress=False, qat=None) -> list[dict]:
    """One tensor quantized at a time (simulated): margin cost at whitelisted positions, flips, KL; ranked by
    the mean margin lost (reference margin minus quantized margin), largest first."""
    from tqdm import tqdm

    from felix.quant_policy import plan_tensor_types

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = plan_tensor_types({k: tuple(v.shape) for k, v in state.items()}, quant, embedding_type)
    targets = all_targets(encoded)
    rows = []
    work = model.__class__(model.cfg).eval()
    for c in tqdm([c for c in plan if c.type != "f32"], desc="per-tensor sensitivity", unit="tensor",
                  disable=not progress, leave=False):
        qstate, _ = quantized_state(state, quant, embedding_type, only=c.name, qat=qat)
        work.load_state_dict(qstate, strict=True)
        stats = compare_logits(ref_logits, score_probes(TorchSource(work), encoded), targets, whitelist)
        w = stats.whitelisted
        rows.append({"tensor": c.name, "type": c.type, "shape": list(c.shape),
                     "margin_cost": float((stats.ref_margin[w] - stats.quant_margin[w]).mean()) if w.any() else 0.0,
                     "flips": int(stats.flipped[w].sum()), "kl_mean": float(stats.kl.mean())})
    return sorted(rows, key=lambda r: -r["margin_cost"])


@dataclass
class FidelityOptions:
    quant: str = "rq4"
    paths: tuple[str, ...] = ("simulated",)
    embedding_type: str | None = None
    probes_file: str | None = None
    n_probes: int = 24
    probe_set: str = "builtin"    # built-in probes when there is no probes_file: see PROBE_SETS
    whitelist_strings: tuple[str, ...] = ()
    whitelist_tokens: tuple[str, ...] = ()
    sensitivity: bool = True
    compliance: bool = True
    max_new_tokens: int = 160
    tokenizer: str | None = None
    gguf_dir: str | None = None   # runtime path: where the exported GGUF files go (default: a temp dir)
    progress: bool = False
    compliance_paths: tuple[str, ...] | None = None  # paths that generate (None: all of `paths`)
    sim_activations: str = "exact"  # simulated path: "exact" activations, or "runtime" (rounded as llama.cpp does)


def _positions_table(encoded, stats: PositionStats, tokenizer) -> list[dict]:
    rows, i = [], 0
    for e in encoded:
        for j, t in enumerate(e.targets):
            if e.whitelisted[j]:
                rows.append({"probe": e.probe.name, "index": j, "token": t, "text": tokenizer.decode([t]),
                             "ref_margin": round(float(stats.ref_margin[i]), 4),
                             "quant_margin": round(float(stats.quant_margin[i]), 4),
                             "flipped": bool(stats.flipped[i]),
                             "runner_up": tokenizer.decode([int(stats.runner_up[i])]),
                             "runner_up_p_ref": round(float(stats.runner_up_logp_ref[i].exp()), 6),
                             "runner_up_log_ratio": round(float(stats.runner_up_logp_quant[i]
                                                                - stats.runner_up_logp_ref[i]), 5)})
            i += 1
    return rows


def _export_pair(checkpoint, quant, embedding_type, directory: Path) -> tuple[Path, Path]:
    """The f32 reference and the quantized file, both in the arch of the runtime that serves `quant` (so the
    reference and the quantized model run in the same llama.cpp and differ only by quantization)."""
    from felix.export import export_gguf

    directory.mkdir(parents=True, exist_ok=True)
    arch = arch_of(quant)
    ref, q = directory / f"reference-f32-{arch}.gguf", directory / f"quantized-{quant}.gguf"
    export_gguf(checkpoint, ref, arch=arch, quant="f32", force=True)
    export_gguf(checkpoint, q, arch=arch, quant=quant, force=True, embedding_type=embedding_type)
    return ref, q


def simulated_model(model, qstate: dict, plan, sim_activations: str):
    """The simulated deployment: `model` on the policy's dequantized weights `qstate`, with activations exact or
    rounded as llama.cpp's CPU matmuls and KV cache round them (felix.activation_rounding)."""
    from felix.activation_rounding import ActivationRounding

    if sim_activations not in SIM_ACTIVATIONS:
        raise FidelityError(f"unknown sim_activations {sim_activations!r}; choose from {', '.join(SIM_ACTIVATIONS)}")
    m = _with_state(model, qstate)
    return m.set_activation_rounding(ActivationRounding.from_plan(plan) if sim_activations == "runtime" else None)


def run_fidelity(checkpoint, opts: FidelityOptions, cache: dict | None = None) -> dict:
    """The full harness on one checkpoint and one quantization: the report as a dict (see write_report).
    `cache`: a dict kept across calls on the same checkpoint, probes and whitelist (several formats), so the
    reference model's logits and generations are computed once per path."""
    import tempfile

    from felix.quant_policy import check_type

    quant = check_type(opts.quant)
    bad_paths = [p for p in opts.paths if p not in PATHS]
    if bad_paths or not opts.paths:
        raise FidelityError(f"unknown path(s) {bad_paths or list(opts.paths)}; choose from {', '.join(PATHS)}")
    if opts.sim_activations not in SIM_ACTIVATIONS:
        raise FidelityError(f"unknown sim_activations {opts.sim_activations!r}; choose from "
                            f"{', '.join(SIM_ACTIVATIONS)}")
    runtime = runtime_of(quant)
    if "runtime" in opts.paths:
        from felix.llamacpp import available

        ok, why = available(runtime)
        if not ok:
            what = "the llama.cpp fork (the only runtime with " + quant + ")" if runtime == "fork" else "llama.cpp"
            raise FidelityError(f"the runtime path runs {what}: {why}")
    model, tok = load_for_fidelity(checkpoint, opts.tokenizer)
    probes = load_probes(opts.probes_file) if opts.probes_file else probe_set(opts.probe_set, opts.n_probes)
    wl = build_probe_whitelist(tok, model.cfg.vocab_size, opts.whitelist_strings, opts.whitelist_tokens)
    for msg in wl.problems:
        print(f"felix fidelity: warning: {msg}", file=sys.stderr)
    encoded = encode_probes(probes, tok, wl.mask)
    targets = all_targets(encoded)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from felix.qat import read_qat_config

    qat = read_qat_config(checkpoint)  # a quantization-aware checkpoint ships the bytes its forward used
    qstate, plan = quantized_state(state, quant, opts.embedding_type, qat=qat)
    report = {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "checkpoint": str(checkpoint), "quant": quant,
        "embedding_type": opts.embedding_type, "paths": list(opts.paths),
        "probes": {"source": opts.probes_file or f"built-in {opts.probe_set} ({opts.n_probes})", "count": len(probes),
                   "names": [p.name for p in probes], "context_window": model.cfg.max_seq_len},
        "whitelist": {"size": int(wl.mask.sum()), "strings": wl.strings, "tokens": wl.tokens,
                      "problems": wl.problems, "unreachable": wl.unreachable,
                      "covered": len({t for e in encoded for j, t in enumerate(e.targets) if e.whitelisted[j]})},
        "qat": None if qat is None else qat.mode,
        "tensor_types": [{"name": c.name, "shape": list(c.shape), "type": c.type, "reason": c.reason,
                          "fallback": c.fallback} for c in plan],
        "results": {}, "sensitivity": None, "agreement": None,
    }
    sim_quant_logits = None
    cache = {} if cache is None else cache
    key = (str(checkpoint), opts.tokenizer, tuple(p.name for p in probes), tuple(wl.mask.nonzero()[:, 0].tolist()),
           opts.max_new_tokens)
    report["sim_activations"] = opts.sim_activations
    report["runtime"] = runtime if "runtime" in opts.paths else None
    for path in opts.paths:
        cache_path = path if path == "simulated" else f"runtime-{runtime}"
        if path == "simulated":
            ref_src = TorchSource(model)
            q_src = TorchSource(simulated_model(model, qstate, plan, opts.sim_activations))
            cleanup = []
        else:
            tmp = None if opts.gguf_dir else tempfile.TemporaryDirectory(prefix="felix-fidelity-")
            ref_path, q_path = _export_pair(checkpoint, quant, opts.embedding_type,
                                            Path(opts.gguf_dir or tmp.name))
            ref_src = LlamaCppSource(ref_path, model.cfg.max_seq_len)
            q_src = LlamaCppSource(q_path, model.cfg.max_seq_len)
            if ref_src.n_vocab != model.cfg.vocab_size:
                raise FidelityError(f"{ref_path} has a vocabulary of {ref_src.n_vocab}, the checkpoint {model.cfg.vocab_size}")
            cleanup = [ref_src.close, q_src.close] + ([tmp.cleanup] if tmp else [])
        try:
            if (key, cache_path, "logits") not in cache:
                cache[key, cache_path, "logits"] = score_probes(ref_src, encoded, opts.progress,
                                                                f"{path}: reference")
            ref_logits = cache[key, cache_path, "logits"]
            q_logits = score_probes(q_src, encoded, opts.progress, f"{path}: {quant}")
            stats = compare_logits(ref_logits, q_logits, targets, wl.mask)
            result = {"summary": summarize(stats), "positions": _positions_table(encoded, stats, tok)}
            if opts.compliance and path in (opts.compliance_paths or opts.paths):
                if (key, cache_path, "generations") not in cache:
                    cache[key, cache_path, "generations"] = compliance_run(
                        ref_src, encoded, tok, opts.max_new_tokens, opts.progress, f"{path}: generating (reference)")
                ref_rows = cache[key, cache_path, "generations"]
                q_rows = compliance_run(q_src, encoded, tok, opts.max_new_tokens, opts.progress,
                                        f"{path}: generating ({quant})")
                result["compliance"] = {"reference": compliance_summary(ref_rows),
                                        "quantized": compliance_summary(q_rows),
                                        "generations": {"reference": ref_rows, "quantized": q_rows}}
            report["results"][path] = result
            if path == "simulated":
                sim_quant_logits = q_logits
                if opts.sensitivity:
                    report["sensitivity"] = sensitivity(model, encoded, quant, opts.embedding_type, wl.mask,
                                                        ref_logits, opts.progress, qat)
            elif sim_quant_logits is not None:
                sim_ref_logits = cache[key, "simulated", "logits"]
                rt_stats = compare_logits(ref_logits, q_logits, targets, wl.mask)
                # each way of simulating against what the runtime computed: position by position (agreement), and
                # as a predictor of the runtime's own quantization effect (KL, margin change): what the activation
                # model buys
                by_sim = {}
                for variant in SIM_ACTIVATIONS:
                    v_logits = sim_quant_logits if variant == opts.sim_activations else score_probes(
                        TorchSource(simulated_model(model, qstate, plan, variant)), encoded, opts.progress,
                        f"simulated ({variant} activations): {quant}")
                    by_sim[variant] = {**agreement(v_logits, q_logits, targets, wl.mask),
                                       **predicted_effect(compare_logits(sim_ref_logits, v_logits, targets, wl.mask),
                                                          rt_stats)}
                report["agreement"] = by_sim[opts.sim_activations]
                report["agreement_by_sim_activations"] = by_sim
        finally:
            for fn in cleanup:
                fn()
    return report


def agreement(sim_logits: torch.Tensor, runtime_logits: torch.Tensor, targets: torch.Tensor,
              whitelist: torch.Tensor) -> dict:
    """How closely the simulated path reproduces the runtime one on the same quantized model."""
    stats = compare_logits(runtime_logits, sim_logits, targets, whitelist)
    w = stats.whitelisted
    scale = runtime_logits.double().abs().max(-1).values.clamp_min(1e-6)
    rel = ((sim_logits.double() - runtime_logits.double()).abs().max(-1).values / scale)
    margin_diff = (stats.ref_margin[w] - stats.quant_margin[w]).abs()
    return {"top1_agreement": float(stats.top1_agree.double().mean()), "kl_mean": float(stats.kl.mean()),
            "kl_p99": _quantile(stats.kl, 0.99), "kl_max": float(stats.kl.max()), "max_rel_err": float(rel.max()),
            "mean_rel_err": float(rel.mean()),
            "margin_abs_diff_max": float(margin_diff.max()) if w.any() else 0.0,
            "margin_abs_diff_mean": float(margin_diff.mean()) if w.any() else 0.0,
            "decision_disagreements": int(stats.flipped[w].sum())}


def predicted_effect(sim: PositionStats, runtime: PositionStats) -> dict:
    """How well a simulation predicts the runtime's quantization effect (each path against its own reference):
    mean KL and the RMS of the whitelisted margin change, simulated / runtime (1.0 = predicted exactly)."""
    def rms_change(st: PositionStats) -> float:
        w = st.whitelisted
        return float((st.quant_margin[w] - st.ref_margin[w]).pow(2).mean().sqrt()) if w.any() else float("nan")

    kl_sim, kl_rt = float(sim.kl.mean()), float(runtime.kl.mean())
    m_sim, m_rt = rms_change(sim), rms_change(runtime)
    return {"sim_kl_mean": kl_sim, "runtime_kl_mean": kl_rt, "kl_mean_ratio": kl_sim / kl_rt if kl_rt else float("nan"),
            "sim_margin_change_rms": m_sim, "runtime_margin_change_rms": m_rt,
            "margin_change_rms_ratio": m_sim / m_rt if m_rt else float("nan")}


# ============================================================================================ gate
@dataclass
class Gate:
    """Thresholds; None = not checked. Margin survival and top-1 agreement are fractions in [0, 1]."""

    min_margin_survival: float | None = None
    max_flips: int | None = None
    max_kl_mean: float | None = None
    max_kl_p99: float | None = None
    min_top1_agreement: float | None = None

    def check(self, report: dict) -> list[str]:
        failures = []
        for path, res in report["results"].items():
            s = res["summary"]
            checks = [(self.min_margin_survival, s["margin"]["survival"], "margin survival", "<"),
                      (self.max_flips, s["margin"]["flips"], "flips", ">"),
                      (self.max_kl_mean, s["kl"]["mean"], "KL mean", ">"),
                      (self.max_kl_p99, s["kl"]["p99"], "KL p99", ">"),
                      (self.min_top1_agreement, s["top1_agreement"], "top-1 agreement", "<")]
            for limit, value, what, bad_if in checks:
                if limit is None:
                    continue
                crossed = (value < limit) if bad_if == "<" else (value > limit)
                if isinstance(value, float) and math.isnan(value):
                    failures.append(f"{path}: {what} is undefined (no whitelisted position the reference decides "
                                    f"correctly, or no positions): cannot show it meets {limit:.4g}")
                elif crossed:
                    failures.append(f"{path}: {what} {value:.4g} {'below' if bad_if == '<' else 'above'} "
                                    f"the threshold {limit:.4g}")
        return failures


# ========================================================================================== output
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_margins(positions: list[dict], path: Path, title: str) -> None:
    """Reference vs quantized margin at whitelisted positions; the flip regions shaded."""
    plt = _plt()
    x = [p["ref_margin"] for p in positions]
    y = [p["quant_margin"] for p in positions]
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = max([1.0] + [abs(v) for v in x + y]) * 1.05
    ax.fill_between([0, lim], -lim, 0, color="red", alpha=0.12, label="lost (flip)")
    ax.fill_between([-lim, 0], 0, lim, color="orange", alpha=0.12, label="gained (flip)")
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
    colors = ["red" if p["flipped"] else "tab:blue" for p in positions]
    ax.scatter(x, y, s=6, c=colors, alpha=0.6)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="reference margin (logits)", ylabel="quantized margin",
           title=title)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_margin_change(positions: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    d = [p["quant_margin"] - p["ref_margin"] for p in positions]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(d, bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="margin change (quantized - reference)", ylabel="whitelisted positions", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_sensitivity(rows: list[dict], path: Path, title: str, top: int = 15) -> None:
    plt = _plt()
    rows = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([f"{r['tensor']} ({r['type']})" for r in rows], [r["margin_cost"] for r in rows], color="tab:red")
    ax.set(xlabel="mean margin lost at whitelisted positions (logits)", title=title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _f(x, nd=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_report(report: dict, plots: dict[str, str]) -> str:
    q = report["quant"]
    low = next((r["summary"]["margin"]["low_threshold"] for r in report["results"].values()), float("nan"))
    lines = [f"# Fidelity report: {report['checkpoint']} at {q}", "",
             f"Probes: {report['probes']['count']} ({report['probes']['source']}), context window "
             f"{report['probes']['context_window']}. Whitelist: {report['whitelist']['size']} tokens, "
             f"{report['whitelist']['covered']} of them expected somewhere in the probes. Low-margin: reference-correct "
             f"whitelisted positions with a reference margin below {low:g} logits (the QUAIL margin).", ""]
    for msg in report["whitelist"]["problems"]:
        lines.append(f"- whitelist problem: {msg}")
    if report["whitelist"]["unreachable"]:
        lines.append(f"- {len(report['whitelist']['unreachable'])} whitelisted tokens are never produced by the "
                     f"tokenizer (no probe can expect them): {', '.join(report['whitelist']['unreachable'][:8])}")
    types = {}
    for t in report["tensor_types"]:
        types.setdefault(t["type"], []).append(t["name"])
    lines += ["", "Tensor types: " + "; ".join(f"{k}: {len(v)}" for k, v in types.items()), "",
              "| path | whitelisted positions | ref. correct | survived | margin survival | low-margin survived | "
              "flips (lost/gained) | mean margin ref -> quant | KL mean | KL p99 | KL max | top-1 agreement | delta-p mean | delta-p rms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, res in report["results"].items():
        s, m = res["summary"], res["summary"]["margin"]
        lines.append(f"| {path} | {s['whitelisted_positions']} | {m['reference_correct']} | {m['survived']} | "
                     f"{_f(m['survival'])} | {m['low_survived']}/{m['low_reference_correct']} | {m['flips']} ({m['lost']}/{m['gained']}) | {_f(m['reference_mean'], 2)}"
                     f" -> {_f(m['quantized_mean'], 2)} | {_f(s['kl']['mean'], 5)} | {_f(s['kl']['p99'], 5)} | "
                     f"{_f(s['kl']['max'], 5)} | {_f(s['top1_agreement'])} | {_f(s['delta_p']['mean'], 5)} | "
                     f"{_f(s['delta_p']['rms'], 5)} |")
    if any("compliance" in r for r in report["results"].values()):
        lines += ["", "Schema compliance of greedy generations (probes with a schema):", "",
                  "| path | model | probes | valid JSON | required fields | field types | enum values | compliant |",
                  "|---|---|---|---|---|---|---|---|"]
        for path, res in report["results"].items():
            for side in ("reference", "quantized"):
                c = res.get("compliance", {}).get(side)
                if c:
                    lines.append(f"| {path} | {side} | {c['probes']} | {c['valid_json']} | {c['required_fields']} | "
                                 f"{c['field_types']} | {c['enum_values']} | {c['compliant']} |")
    if report.get("agreement_by_sim_activations"):
        lines += ["", f"Simulated vs runtime ({q} in {report.get('runtime') or 'llama.cpp'} llama.cpp; the report's "
                      f"simulated path uses {report.get('sim_activations', 'exact')} activations):", "",
                  "| simulated activations | top-1 agreement | max rel. logit error | mean rel. logit error | KL sim -> "
                  "runtime | mean / max |margin diff| | decisions that differ | predicted / runtime KL(ref -> quant) | "
                  "predicted / runtime margin-change RMS |", "|---|---|---|---|---|---|---|---|---|"]
        for name, a in report["agreement_by_sim_activations"].items():
            lines.append(f"| {name} | {_f(a['top1_agreement'])} | {_f(a['max_rel_err'])} | {_f(a['mean_rel_err'])} | "
                         f"{_f(a['kl_mean'], 6)} | {_f(a['margin_abs_diff_mean'])} / {_f(a['margin_abs_diff_max'])} | "
                         f"{a['decision_disagreements']} | {_f(a['sim_kl_mean'], 6)} / {_f(a['runtime_kl_mean'], 6)} "
                         f"({_f(a['kl_mean_ratio'], 2)}x) | {_f(a['sim_margin_change_rms'])} / "
                         f"{_f(a['runtime_margin_change_rms'])} ({_f(a['margin_change_rms_ratio'], 2)}x) |")
    elif report.get("agreement"):
        a = report["agreement"]
        lines += ["", f"Simulated vs runtime ({q}): top-1 agreement {_f(a['top1_agreement'])}, max relative logit "
                      f"error {_f(a['max_rel_err'])}, max |margin difference| {_f(a['margin_abs_diff_max'])}, "
                      f"{a['decision_disagreements']} whitelisted decisions differ."]
    for path, res in report["results"].items():
        flips = [p for p in res["positions"] if p["flipped"]]
        if flips:
            lines += ["", f"Flipped decisions ({path}, first 20):", "", "| probe | index | token | ref | quant |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['probe']} | {p['index']} | `{p['text']!r}` | {p['ref_margin']:.3f} | "
                      f"{p['quant_margin']:.3f} |" for p in flips[:20]]
    if report.get("sensitivity"):
        lines += ["", "Per-tensor sensitivity (one tensor quantized at a time, simulated; top 10):", "",
                  "| tensor | type | mean margin lost | flips | KL mean |", "|---|---|---|---|---|"]
        lines += [f"| {r['tensor']} | {r['type']} | {r['margin_cost']:.4f} | {r['flips']} | {r['kl_mean']:.5f} |"
                  for r in report["sensitivity"][:10]]
    if report.get("gate"):
        g = report["gate"]
        lines += ["", f"Gate: {'PASSED' if g['passed'] else 'FAILED'}"] + [f"- {f}" for f in g["failures"]]
    lines += [""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(report: dict, out_dir, stem: str | None = None) -> dict[str, Path]:
    """report JSON (NaN -> null), Markdown and PNG plots into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"fidelity-{report['quant']}"
    files, plots = {}, {}
    for path, res in report["results"].items():
        title = f"{report['quant']} ({path})"
        if res["positions"]:
            f = out / f"{stem}-{path}-margins.png"
            plot_margins(res["positions"], f, title)
            plots[f"margins {path}"] = f.name
            f = out / f"{stem}-{path}-margin-change.png"
            plot_margin_change(res["positions"], f, title)
            plots[f"margin change {path}"] = f.name
    if report.get("sensitivity"):
        f = out / f"{stem}-sensitivity.png"
        plot_sensitivity(report["sensitivity"], f, f"per-tensor sensitivity, {report['quant']}")
        plots["sensitivity"] = f.name
    files["json"] = out / f"{stem}.json"
    files["json"].write_text(json.dumps(_jsonable(report), indent=1))
    files["markdown"] = out / f"{stem}.md"
    files["markdown"].write_text(markdown_report(report, plots))
    files.update({k: out / v for k, v in plots.items()})
    return files
