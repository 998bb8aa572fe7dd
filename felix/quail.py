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

import re
from typing import Iterable

import torch

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


def build_whitelist(tokenizer, strings: Iterable[str] = (), patterns: Iterable[str] = (),
                    structure_chars: str = JSON_STRUCTURE_CHARS, literals: Iterable[str] = JSON_LITERALS,
                    vocab_size: int | None = None) -> torch.Tensor:
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
