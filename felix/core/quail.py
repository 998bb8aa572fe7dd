"""The QUAIL whitelist: which vocabulary tokens carry decisions that must survive 4-bit deployment.

`build_whitelist(tokenizer, ...)` returns a bool mask over the vocabulary for `felix.linear_ce_quail`:

* every token whose decoded text contains a JSON structural character (``{ } [ ] " : ,``) — the tokens
  whose loss breaks a record's syntax;
* every token of the encodings of the given strings: JSON literals (``true``, ``false``, ``null``), the
  schema's field names, refusal phrases — each encoded alone and after a space, since byte-level BPE
  spells a word differently at the start of a text and after a space;
* optionally every token whose decoded text matches one of the given regular expressions.

Works with an HF ``tokenizers.Tokenizer`` (``get_vocab_size``/``decode``/``encode(...).ids``) or a
transformers-style tokenizer (``len``/``decode``/``encode`` returning ids).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch

from felix.core.files import read_json

# The QUAIL defaults, defined once: the op (felix.linear_ce_quail), the trainer (TrainConfig, `felix train`), the
# fidelity harness (its low-margin threshold) and the README all read these.
#
# DEFAULT_MARGIN = 2.0 logits, from measurements, not a guess: the 1st percentile of the per-position margin change
# under 4-bit quantization at whitelisted positions (`felix fidelity`, simulated path) was -0.45 to -1.17 logits
# over the formats and seeds of reports/quail-experiment (rq4 pooled -0.98 without QUAIL). A margin of 1.0 sits
# inside that tail: a decision held at
# exactly the hinge's margin is lost by the worst 1% of rounding draws. 2.0 clears the largest measured p01 with
# ~0.8 logits to spare. `felix train --margin-from fidelity-rq4.json` replaces it by the measured value for one
# model and format (margin_from_fidelity below).
# DEFAULT_LAMBDA_Q = 0.1: the hinge stays a correction on top of cross-entropy (it only acts on the protected
# positions below the margin); at 0.1 it cost ~2-4% validation CE in reports/quail-experiment.
DEFAULT_MARGIN = 2.0
DEFAULT_LAMBDA_Q = 0.1
# The lower-tail quantile of the measured margin change that a calibrated margin covers (1%: see margin_from_noise)
DEFAULT_NOISE_QUANTILE = 0.01
NOISE_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.5)  # what the fidelity harness reports (summary.margin.change_quantiles)


@dataclass(frozen=True)
class QuailConfig:
    """The QUAIL hinge's settings as one object: the margin (logits) protected decisions must keep, the hinge's
    weight lambda_q, and the lower-tail quantile a calibrated margin covers. The trainer (TrainConfig.quail), the
    op (felix.linear_ce_quail / LinearCEQuail take margin and lambda_q from it) and the fidelity harness (its
    low-margin threshold) use it; DEFAULT_QUAIL holds the defaults above."""

    margin: float = DEFAULT_MARGIN
    lambda_q: float = DEFAULT_LAMBDA_Q
    noise_quantile: float = DEFAULT_NOISE_QUANTILE

    def __post_init__(self):
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"QUAIL margin must be a finite number >= 0, got {self.margin}")
        if not (math.isfinite(self.lambda_q) and self.lambda_q >= 0):
            raise ValueError(f"QUAIL lambda_q must be a finite number >= 0, got {self.lambda_q}")
        if not 0 < self.noise_quantile < 1:
            raise ValueError(f"QUAIL noise quantile must lie in (0, 1), got {self.noise_quantile}")

    @classmethod
    def calibrated(
        cls, report, quantile: float = DEFAULT_NOISE_QUANTILE, lambda_q: float = DEFAULT_LAMBDA_Q
    ) -> QuailConfig:
        """The margin measured in a `felix fidelity` report (margin_from_fidelity at `quantile`)."""
        return cls(margin_from_fidelity(report, quantile), lambda_q, quantile)


DEFAULT_QUAIL = QuailConfig()

JSON_STRUCTURE_CHARS = '{}[]":,'
JSON_LITERALS = ("true", "false", "null")
# Refusal-path phrases of the seed task suite (principle abstraction with has_principle=false, declines)
DEFAULT_REFUSAL_PHRASES = ("has_principle", "I can't", "I cannot", "I'm sorry", "not enough information")


def _vocab_size(tokenizer) -> int:
    if hasattr(tokenizer, "get_vocab_size"):
        return tokenizer.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids if hasattr(enc, "ids") else enc)


def _decode(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode([token_id])


def build_whitelist(
    tokenizer,
    strings: Iterable[str] = (),
    patterns: Iterable[str] = (),
    structure_chars: str = JSON_STRUCTURE_CHARS,
    literals: Iterable[str] = JSON_LITERALS,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """A bool mask [vocab_size] of the tokens the QUAIL hinge protects (see the module docstring).

    `strings`: field names, refusal phrases, ... (their tokens are marked); `patterns`: regular
    expressions matched (re.search) against each token's decoded text; `vocab_size`: the model's
    vocabulary when it is larger than the tokenizer's (padded embeddings)."""
    n_tok = _vocab_size(tokenizer)
    size = n_tok if vocab_size is None else int(vocab_size)
    if size < n_tok:
        raise ValueError(f"vocab_size {size} is smaller than the tokenizer's vocabulary ({n_tok})")
    mask = torch.zeros(size, dtype=torch.bool)
    regexes = [re.compile(p) for p in patterns]
    chars = set(structure_chars)
    for i in range(n_tok):
        text = _decode(tokenizer, i)
        if chars & set(text) or any(r.search(text) for r in regexes):
            mask[i] = True
    for s in [*literals, *strings]:
        if not s:
            continue
        for variant in (s, " " + s):
            ids = _encode(tokenizer, variant)
            if ids:
                mask[torch.tensor(ids)] = True
    return mask


def describe_whitelist(tokenizer, mask: torch.Tensor, limit: int = 40) -> str:
    """A short human-readable summary: how many tokens, and the first few of them."""
    ids = mask.nonzero()[:, 0].tolist()
    shown = ", ".join(repr(_decode(tokenizer, i)) for i in ids[:limit])
    more = f", ... (+{len(ids) - limit})" if len(ids) > limit else ""
    return f"{len(ids)} of {mask.numel()} tokens whitelisted: {shown}{more}"


# ------------------------------------------------------------------------------ margin calibration
class CalibrationError(ValueError):
    """A fidelity report that cannot calibrate a margin (wrong file, missing field, no downward noise)."""


def margin_from_noise(change_quantile: float) -> float:
    """THE calibration rule, in one place: the QUAIL margin is the size of the lower tail of the margin change
    that quantization causes at whitelisted positions, ``margin = -q`` where ``q`` is the measured quantile
    (default the 1st percentile) of ``quantized margin - reference margin``. A decision whose reference margin
    is at least this large then survives the rounding in all but that quantile's share of draws (per position,
    as measured). A quantile >= 0 means quantization did not lower margins at that quantile: there is nothing
    to calibrate against, and a margin of 0 would switch the hinge off, so that is an error."""
    q = float(change_quantile)
    if not math.isfinite(q):
        raise CalibrationError(f"the measured margin-change quantile is {q}: not a number to calibrate from")
    if q >= 0:
        raise CalibrationError(
            f"the measured margin-change quantile is {q:+.4f} >= 0: quantization did not lower "
            f"whitelisted margins at this quantile, so it gives no margin to protect against; "
            f"keep the default ({DEFAULT_MARGIN}) or pick a lower quantile"
        )
    return -q


def quantile_key(quantile: float) -> str:
    """A quantile's key in a fidelity report's ``change_quantiles`` (0.05 -> "0.05"): one spelling for the writer
    (felix.verify.fidelity.metrics.summarize) and the reader (margin_from_fidelity)."""
    return f"{quantile:g}"


def margin_from_fidelity(report, quantile: float = DEFAULT_NOISE_QUANTILE, path: str = "simulated") -> float:
    """The calibrated margin (margin_from_noise) from a `felix fidelity` JSON report (a file path or the loaded
    dict): its measured change quantile at whitelisted positions, ``results[path].summary.margin
    .change_quantiles[quantile]``. Raises CalibrationError naming what is missing."""
    where = "the fidelity report"
    if not isinstance(report, dict):
        where = str(report)
        report = read_json(report, CalibrationError, "fidelity report", expect=None)
    if not isinstance(report, dict) or report.get("schema") != "felix-fidelity-report":
        raise CalibrationError(
            f"{where} is not a felix fidelity report (no schema 'felix-fidelity-report'); pass "
            f"the fidelity-<quant>.json that `felix fidelity` writes"
        )
    results = report.get("results") or {}
    if not isinstance(results, dict):
        raise CalibrationError(f"{where}: 'results' is a JSON {type(results).__name__}, not an object")
    if path not in results:
        raise CalibrationError(f"{where} has no {path!r} path result (it has: {', '.join(results) or 'none'})")
    margin = results[path]
    for part in ("summary", "margin"):
        margin = margin.get(part, {}) if isinstance(margin, dict) else {}
    quantiles = margin.get("change_quantiles") if isinstance(margin, dict) else None
    if not isinstance(quantiles, dict):
        raise CalibrationError(
            f"{where} lacks summary.margin.change_quantiles (written by felix fidelity since "
            f"schema version 2; this report is version {report.get('schema_version')}): rerun "
            f"`felix fidelity` on the checkpoint"
        )
    key = quantile_key(quantile)
    if quantiles.get(key) is None:
        raise CalibrationError(
            f"{where} reports margin-change quantiles {', '.join(quantiles)}, not {key}; choose "
            f"one of those (or no whitelisted position was measured)"
        )
    if isinstance(quantiles[key], bool) or not isinstance(quantiles[key], (int, float)):
        raise CalibrationError(f"{where}: change_quantiles[{key!r}] is {quantiles[key]!r}, not a number")
    return margin_from_noise(quantiles[key])
