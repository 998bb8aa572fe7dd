"""Edit requests: ``(prompt, target)`` pairs, read from JSONL or built in code, checked and tokenized, and laid out
as the teacher-forced sequences the editor, the key capture and the metrics run the model on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from felix.core.files import jsonl_lines, read_text
from felix.model.tokenizer import SPECIAL_TOKENS
from felix.tools.edit.errors import EditError, UntokenisableError


@dataclass
class EditRequest:
    """After `prompt` the model should continue with `target`; paraphrases (other prompts for the same fact) are
    what the harness measures generalisation on, name labels the edit in listings."""

    prompt: str
    target: str
    paraphrases: tuple[str, ...] = ()
    name: str = ""


def load_requests(path) -> list[EditRequest]:
    """JSONL of {"prompt", "target"} (+ "paraphrases", "name"), read by felix.core.files' one JSONL reader; every
    malformed line is reported as path:line, a missing or binary file by name."""
    out, problems = [], []
    for where, d, problem in jsonl_lines(read_text(path, EditError, "edit request file"), path):
        if problem is None and (not isinstance(d, dict) or not {"prompt", "target"} <= set(d)):
            problem = "needs keys prompt and target"
        elif problem is None:
            bad = [k for k in ("prompt", "target", "name") if k in d and not isinstance(d[k], str)]
            paraphrases = d.get("paraphrases", [])
            if bad:
                problem = f"{', '.join(bad)} must be text"
            elif not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
                problem = "paraphrases must be a list of texts"
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        out.append(EditRequest(d["prompt"], d["target"], tuple(d.get("paraphrases", ())), d.get("name", "")))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise EditError("bad edit requests: " + "; ".join(problems[:5]) + more)
    if not out:
        raise EditError(f"{path} holds no edit requests")
    return out


def tokenize_request(tokenizer, model, req: EditRequest) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids), each text tokenized on its own and concatenated; refused when a text is empty,
    holds special-token text, does not round-trip, or has ids outside the model's vocabulary."""
    out = []
    for role, text in (("prompt", req.prompt), ("target", req.target)):
        if not isinstance(text, str):
            raise UntokenisableError(f"{role} must be a string, got {type(text).__name__}")
        if not text:
            verb = "condition on" if role == "prompt" else "write"
            raise UntokenisableError(f"the {role} is empty: there is no token to {verb}")
        specials = [s for s in SPECIAL_TOKENS if s in text] if role == "target" else []
        if specials:
            raise UntokenisableError(
                f"target {text!r} holds special-token text {specials}: a target must be plain "
                "text (special tokens are control ids, not something an edit writes)"
            )
        ids = tokenizer.encode(text)
        if not ids:
            raise UntokenisableError(f"the tokenizer gives no tokens for the {role} {text!r}")
        back = tokenizer.decode(ids)
        if back != text:
            raise UntokenisableError(f"the {role} {text!r} is not tokenisable: it decodes back as {back!r}")
        bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
        if bad:
            raise UntokenisableError(
                f"the {role} {text!r} has token ids {bad} outside the model's vocabulary of {model.cfg.vocab_size}"
            )
        out.append(ids)
    if len(out[0]) + len(out[1]) > model.cfg.max_seq_len:
        raise UntokenisableError(
            f"prompt + target are {len(out[0]) + len(out[1])} tokens, over max_seq_len {model.cfg.max_seq_len}"
        )
    return out[0], out[1]


def target_sequence(prompt_ids, target_ids) -> tuple[list[int], list[int]]:
    """Input ids (the prompt, then the target but its last token), and the positions whose next-token prediction
    is a target token (teacher forcing)."""
    ids = list(prompt_ids) + list(target_ids[:-1])
    return ids, list(range(len(prompt_ids) - 1, len(ids)))


def pad_batch(seqs: list[list[int]], pad: int = 0) -> torch.Tensor:
    """Token sequences as one [B, longest] batch, right-padded with `pad` (harmless under causal attention for
    every real position)."""
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)
