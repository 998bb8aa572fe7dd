"""Training data for Felix-LM: a built-in corpus, structured-output records, user files, token streams.

Everything here works offline on any machine:

* :func:`builtin_corpus` -- English prose shipped with Python itself (the ``pydoc_data`` help topics) plus
  docstrings and source of a few stdlib modules, together with :func:`structured_records` rendered as chat
  text. No download, same text everywhere (for a given Python version).
* :func:`structured_records` (felix.tasks.records, the task world's home; re-exported here) -- a seeded generator
  of records in the shapes of the seed project's task suite: memory *encoding* (JSON), *episode summarization*
  (JSON), *principle abstraction* (JSON; ``has_principle: false`` is the refusal path) and *retrieval synthesis*
  (2-5 sentences of prose). These are what gives the QUAIL whitelist (JSON structure tokens) something real to
  protect.
* :func:`load_user_data` -- ``--data`` files: ``.jsonl`` (``{"text"}`` or ``{"prompt", "response"}`` per line,
  extra keys such as ``teacher`` allowed) or plain text. Malformed lines are reported by line number; a file in
  which most lines are bad is an error rather than silently training on the few good ones.
* :func:`split_documents` -- the held-out validation split (by document, deterministic).
* :class:`TokenStream` -- documents -> one token stream -> fixed-length windows served in a seeded order per
  epoch, with an exactly restorable cursor and a count of corpus *wraps* (the memorization monitor needs it).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from pydoc_data.topics import topics

from felix.core.files import jsonl_lines, read_text
from felix.model.chat import END, chat_prompt, chat_text

# the task world's records live in felix.tasks; re-exported here, where the corpus and older callers find them
from felix.tasks.records import (  # noqa: F401 (re-exported)
    HEDGES,
    MAKERS,
    N_REVIEWERS,
    PRINCIPLE_HEDGED,
    PRINCIPLE_WEIGHED,
    REVIEW_WEIGHTS,
    TASKS,
    hedge_bayes_margin,
    hedged_probe_records,
    structured_records,
    weighed_evidence,
    weighed_probe_records,
)


class DataError(ValueError):
    """A data file cannot be used (missing, unreadable, or mostly malformed lines)."""


# ------------------------------------------------------------------------------- built-in prose
_STDLIB_MODULES = (
    "json",
    "collections",
    "functools",
    "itertools",
    "textwrap",
    "string",
    "pathlib",
    "argparse",
    "dataclasses",
    "heapq",
    "bisect",
    "statistics",
    "fractions",
    "difflib",
    "shlex",
    "csv",
    "contextlib",
    "enum",
    "random",
    "typing",
)
_SOURCE_MODULES = ("textwrap", "heapq", "bisect", "difflib", "shlex")


def paragraph_chunks(text: str, max_chars: int = 2000) -> list[str]:
    """Cut a long text at blank lines into pieces of about `max_chars` (a paragraph is never split), so that
    document counts track token counts and a by-document validation split mirrors the training mix."""
    chunks, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) + 2 > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current.strip():
        chunks.append(current)
    return chunks


def builtin_prose() -> list[str]:
    """Text that ships with Python: every pydoc help topic, docstrings of common stdlib modules and their
    public members, and the full source of a few small pure-Python modules, in paragraph chunks of about
    2,000 characters (so that prose and short structured records weigh in a split by their size)."""
    docs = [topics[name].strip() for name in sorted(topics) if topics[name].strip()]
    for mod_name in _STDLIB_MODULES:
        mod = importlib.import_module(mod_name)
        parts = [inspect.getdoc(mod) or ""]
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name, None)
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc:
                parts.append(f"{mod_name}.{name}: {doc}")
        docs.append("\n\n".join(p for p in parts if p))
    for mod_name in _SOURCE_MODULES:
        docs.append(inspect.getsource(importlib.import_module(mod_name)))
    return [chunk for doc in docs for chunk in paragraph_chunks(doc)]


def builtin_corpus(
    n_records: int = 2000, seed: int = 0, tasks: tuple[str, ...] = TASKS, prose: bool = True
) -> list[str]:
    """The default training corpus: built-in prose (unless `prose` is False) plus `n_records` structured chat
    records of `tasks`."""
    records = [chat_text(r["prompt"], r["response"]) for r in structured_records(n_records, seed, tuple(tasks))]
    return (builtin_prose() if prose else []) + records


# ------------------------------------------------------------------------------- user files
@dataclass
class LoadedData:
    """Documents from user files, plus the malformed lines that were skipped ("path:line: reason")."""

    documents: list[str]
    records: list[dict]
    skipped: list[str]


def load_user_data(paths, max_bad_fraction: float = 0.5) -> LoadedData:
    """Read ``.jsonl`` (one JSON object per line: ``{"text": ...}`` or ``{"prompt": ..., "response": ...}``)
    or any other file as plain text (one document per file). Malformed JSONL lines are listed with their line
    numbers; if more than `max_bad_fraction` of a file's non-empty lines are bad, raises :class:`DataError`."""
    documents, records, skipped = [], [], []
    for path in map(Path, paths):
        text = read_text(path, DataError, "data file")
        if path.suffix != ".jsonl":
            if text.strip():
                documents.append(text)
            continue
        bad, good = [], 0
        for where, obj, problem in jsonl_lines(text, path):
            if problem:
                bad.append(f"{where}: {problem}")
                continue
            if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
                documents.append(obj["text"])
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                records.append(obj)
                documents.append(chat_text(obj["prompt"], obj["response"]))
            else:
                bad.append(
                    f"{where}: expected an object with a non-empty string 'text', or string 'prompt' and 'response'"
                )
                continue
            good += 1
        if bad and len(bad) > max_bad_fraction * (len(bad) + good):
            shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DataError(
                f"{path}: {len(bad)} of {len(bad) + good} non-empty lines are malformed; refusing to "
                f"train on the rest:\n  {shown}"
            )
        skipped += bad
    if not documents:
        raise DataError(f"no usable documents in {', '.join(map(str, paths))}")
    return LoadedData(documents, records, skipped)


def split_documents(docs: list, val_fraction: float = 0.05, seed: int = 0, key=str) -> tuple[list, list]:
    """Deterministic train/validation split by document (a hash of seed, position and ``key(doc)``), so no
    document has text on both sides. At least one document goes to each side when there are two or more."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def score(i_doc):
        h = hashlib.sha256(f"{seed}:{i_doc[0]}:{key(i_doc[1])}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    scored = sorted(enumerate(docs), key=score)
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1) if len(docs) > 1 else 0
    val_ids = {i for i, _ in scored[:n_val]}
    return [d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids]


# ------------------------------------------------------------------------------- token stream
class EpochCursor:
    """Serves row indices 0..n_windows-1 in a fresh seeded order each epoch. ``wraps`` counts completed passes
    over the corpus; ``state_dict``/``load_state_dict`` restore the cursor exactly (for resume)."""

    def _start_cursor(self, n_windows: int, seed: int) -> None:
        self.n_windows, self.seed = n_windows, seed
        self.epoch, self.position = 0, 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    @property
    def wraps(self) -> int:
        return self.epoch

    def next_indices(self, count: int) -> list[int]:
        picks = []
        for _ in range(count):
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            picks.append(int(self._order[self.position]))
            self.position += 1
        return picks

    def skip(self, count: int) -> None:
        """Advance the cursor past `count` rows without reading them (another rank's micro-batch)."""
        self.next_indices(count)

    @property
    def epoch_progress(self) -> float:
        return self.position / self.n_windows

    def spread_indices(self, count: int) -> list[int]:
        """Up to `count` indices spread evenly over the corpus (for a stable evaluation sample)."""
        n = min(self.n_windows, count)
        return torch.linspace(0, self.n_windows - 1, n).round().long().tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise DataError(
                f"cannot resume: the data stream has {self.n_windows} windows (seed {self.seed}) but the "
                f"checkpoint was taken on {state['n_windows']} windows (seed {state['seed']}); "
                f"resume with the same data, tokenizer and --seq-len"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._order_for(self.epoch)


class TokenStream(EpochCursor):
    """Documents tokenized as ``bos ids eos`` and concatenated; cut into windows of ``seq_len + 1`` tokens
    (stride seq_len) served in a fresh seeded order each epoch (see :class:`EpochCursor`)."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int, seed: int = 0):
        if token_ids.numel() < seq_len + 1:
            raise DataError(
                f"the corpus has {token_ids.numel()} tokens, fewer than one window of seq_len+1 = "
                f"{seq_len + 1}; add data or lower --seq-len"
            )
        self.tokens = token_ids.long()
        self.seq_len = seq_len
        self._start_cursor((self.tokens.numel() - 1) // seq_len, seed)

    @classmethod
    def from_documents(cls, docs: list[str], tokenizer, seq_len: int, seed: int = 0) -> TokenStream:
        ids = []
        for d in docs:
            ids += [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]
        return cls(torch.tensor(ids, dtype=torch.long), seq_len, seed)

    def _windows(self, picks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([self.tokens[w * self.seq_len : (w + 1) * self.seq_len + 1] for w in picks])
        return batch[:, :-1], batch[:, 1:]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len]; targets are inputs shifted by one token."""
        return self._windows(self.next_indices(batch_size))

    def fixed_batches(self, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Windows spread evenly over the corpus, for evaluation; does not move the cursor."""
        picks = self.spread_indices(batch_size * n_batches)
        return [self._windows(picks[s : s + batch_size]) for s in range(0, len(picks), batch_size)]


# ------------------------------------------------------------------ distillation (masked SFT)
def load_teacher_records(paths, max_bad_fraction: float = 0.5) -> tuple[list[dict], list[str]]:
    """Teacher outputs for black-box distillation: JSONL lines ``{"prompt", "response", "teacher"}`` (non-empty
    strings; other keys kept). Returns (records, skipped lines as "path:line: reason"); a file whose bad lines
    exceed `max_bad_fraction` raises :class:`DataError` listing them."""
    records, skipped = [], []
    for path in map(Path, paths):
        bad, good = [], []
        for where, obj, problem in jsonl_lines(read_text(path, DataError, "teacher file"), path):
            if problem:
                bad.append(f"{where}: {problem}")
                continue
            if isinstance(obj, dict) and all(
                isinstance(obj.get(k), str) and obj[k] for k in ("prompt", "response", "teacher")
            ):
                good.append(obj)
            else:
                bad.append(f"{where}: expected non-empty strings 'prompt', 'response' and 'teacher'")
        if bad and len(bad) > max_bad_fraction * (len(bad) + len(good)):
            raise DataError(
                f"{path}: {len(bad)} of {len(bad) + len(good)} non-empty lines are malformed; refusing "
                f"to train on the rest:\n  " + "\n  ".join(bad[:10])
            )
        records += good
        skipped += bad
    if not records:
        raise DataError(f"no teacher records in {', '.join(map(str, paths))}")
    return records, skipped


class SFTStream(EpochCursor):
    """Chat records as masked SFT rows: ``bos + chat_prompt(prompt) + response + END + eos``, padded (or cut) to
    seq_len + 1; targets on the prompt and the padding are ``ignore_index`` so only the response is learned.
    Rows are served in a seeded order per epoch, with the same cursor/wraps/state API as :class:`TokenStream`."""

    def __init__(self, records: list[dict], tokenizer, seq_len: int, seed: int = 0, ignore_index: int = -100):
        if not records:
            raise DataError("no records for supervised fine-tuning")
        self.seq_len, self.ignore_index = seq_len, ignore_index
        rows, masks, self.truncated, self.dropped = [], [], 0, 0
        for r in records:
            prompt = [tokenizer.bos_id, *tokenizer.encode(chat_prompt(r["prompt"]))]
            answer = [*tokenizer.encode(r["response"] + END), tokenizer.eos_id]
            if len(prompt) >= seq_len + 1:
                self.dropped += 1  # the prompt alone fills the window: nothing to learn
                continue
            ids, learn = prompt + answer, [False] * len(prompt) + [True] * len(answer)
            if len(ids) > seq_len + 1:
                self.truncated += 1
                ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
            pad = seq_len + 1 - len(ids)
            rows.append(ids + [tokenizer.pad_id] * pad)
            masks.append(learn + [False] * pad)
        if not rows:
            raise DataError(f"every prompt is longer than seq_len {seq_len}: nothing left to learn")
        self.rows, self.learn = torch.tensor(rows), torch.tensor(masks)
        self.tokens = self.rows[self.learn]  # the learned tokens (for counts in logs)
        self._start_cursor(len(rows), seed)

    def _rows(self, picks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(picks)
        rows, learn = self.rows[index], self.learn[index]
        return rows[:, :-1], rows[:, 1:].masked_fill(~learn[:, 1:], self.ignore_index)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(self.next_indices(batch_size))

    def fixed_batches(self, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        picks = self.spread_indices(batch_size * n_batches)
        return [self._rows(picks[s : s + batch_size]) for s in range(0, len(picks), batch_size)]
