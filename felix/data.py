"""Training data for Felix-LM: a built-in corpus, structured-output records, user files, token streams.

Everything here works offline on any machine:

* :func:`builtin_corpus` -- English prose shipped with Python itself (the ``pydoc_data`` help topics) plus
  docstrings and source of a few stdlib modules, together with :func:`structured_records` rendered as chat
  text. No download, same text everywhere (for a given Python version).
* :func:`structured_records` -- a seeded generator of records in the shapes of the seed project's task suite:
  memory *encoding* (JSON), *episode summarization* (JSON), *principle abstraction* (JSON; ``has_principle:
  false`` is the refusal path) and *retrieval synthesis* (2-5 sentences of prose). These are what gives the
  QUAIL whitelist (JSON structure tokens) something real to protect.
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
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from felix.files import jsonl_lines, read_text

# Chat role markers. The tokenizer registers them as special tokens (felix/tokenizer.py).
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"

TASKS = ("encoding", "episode", "principle", "synthesis")


class DataError(ValueError):
    """A data file cannot be used (missing, unreadable, or mostly malformed lines)."""


def chat_text(prompt: str, response: str, system: str | None = None) -> str:
    """One chat exchange in Felix's chat format (role markers on their own lines, END closes each turn)."""
    head = f"{SYSTEM}\n{system}{END}\n" if system else ""
    return f"{head}{USER}\n{prompt}{END}\n{ASSISTANT}\n{response}{END}"


def chat_prompt(prompt: str, system: str | None = None) -> str:
    """The prompt part of :func:`chat_text`, ending where the assistant's response begins."""
    head = f"{SYSTEM}\n{system}{END}\n" if system else ""
    return f"{head}{USER}\n{prompt}{END}\n{ASSISTANT}\n"


# ------------------------------------------------------------------------------- built-in prose
_STDLIB_MODULES = ("json", "collections", "functools", "itertools", "textwrap", "string", "pathlib",
                   "argparse", "dataclasses", "heapq", "bisect", "statistics", "fractions", "difflib",
                   "shlex", "csv", "contextlib", "enum", "random", "typing")
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
    from pydoc_data.topics import topics

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


# ----------------------------------------------------------------------- structured records
_SUBJECTS = ["the build pipeline", "the billing service", "the search index", "the mobile app release",
             "the database migration", "the onboarding flow", "the cache layer", "the payment retry job",
             "the nightly backup", "the recommendation model", "the API gateway", "the login page",
             "the analytics dashboard", "the email scheduler", "the config loader", "the GPU cluster",
             "the garden irrigation timer", "the team offsite", "the quarterly budget", "the reading group"]
_ACTORS = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Maya",
           "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tomas"]
_EVENTS = [("failed after a dependency upgrade", "rolled the dependency back and pinned its version",
            "pin dependencies and upgrade them deliberately"),
           ("slowed down under peak load", "added an index and a read replica",
            "measure the hot path before scaling hardware"),
           ("lost data during a restart", "made the writer flush before acknowledging",
            "acknowledge only what is durable"),
           ("produced duplicate records", "made the handler idempotent with a request key",
            "design retries to be idempotent"),
           ("timed out for users abroad", "moved static assets to a CDN", "serve content close to the user"),
           ("crashed on an empty input", "added validation with a clear error message",
            "validate inputs at the boundary"),
           ("drifted from the documentation", "generated the docs from the schema",
            "keep one source of truth"),
           ("ran over its deadline", "split the work into weekly milestones", "small steps expose delays early"),
           ("confused new users", "rewrote the first screen with one clear action",
            "reduce choices at the start"),
           ("used twice the expected memory", "streamed the file instead of loading it whole",
            "stream large data")]
_MOODS = ["frustrating", "routine", "tense", "satisfying", "surprising", "tiring"]
_KINDS = ["incident", "decision", "lesson", "observation", "plan"]


def _concepts(rng: random.Random, subject: str, event: tuple[str, str, str]) -> list[str]:
    words = [w for w in (subject.split()[-1], event[0].split()[-1], max(event[1].split(), key=len)) if w.isalpha()]
    extra = rng.sample(["reliability", "performance", "testing", "communication", "planning", "debugging",
                        "data integrity", "user experience", "operations", "learning"], 2)
    return list(dict.fromkeys(w.lower() for w in words + extra))


def _encoding_record(rng: random.Random) -> dict:
    subject, actor, event = rng.choice(_SUBJECTS), rng.choice(_ACTORS), rng.choice(_EVENTS)
    mood, kind = rng.choice(_MOODS), rng.choice(_KINDS)
    day = rng.randint(1, 28)
    observation = (f"On day {day}, {actor} noticed that {subject} {event[0]}. After some investigation the team "
                   f"{event[1]}. It was a {mood} afternoon.")
    salience = round(rng.uniform(0.2, 0.95), 2)
    response = {
        "gist": f"{subject.removeprefix('the ').capitalize()} {event[0]}; fixed by a change.",
        "summary": f"{actor} found that {subject} {event[0]}; the team {event[1]}.",
        "concepts": _concepts(rng, subject, event),
        "structured_concepts": {"people": [actor], "systems": [subject.removeprefix("the ")],
                                "actions": [event[1]], "kind": kind},
        "significance": f"Shows that teams should {event[2]}.",
        "salience": salience,
        "emotional_tone": mood,
    }
    prompt = f"Encode this observation as a memory (JSON).\nObservation: {observation}"
    return {"task": "encoding", "prompt": prompt, "response": json.dumps(response)}


def _episode_record(rng: random.Random) -> dict:
    n = rng.randint(2, 4)
    subject = rng.choice(_SUBJECTS)
    steps = [(rng.choice(_ACTORS), rng.choice(_EVENTS)) for _ in range(n)]
    lines = [f"- {a} reported that {subject} {e[0]}; they {e[1]}." for a, e in steps]
    response = {
        "title": f"Week of fixes on {subject.removeprefix('the ')}",
        "summary": " ".join(f"{a} handled a case where it {e[0]} and {e[1]}." for a, e in steps),
        "concepts": list(dict.fromkeys(c for _, e in steps for c in _concepts(rng, subject, e)))[:6],
        "salience": round(rng.uniform(0.3, 0.9), 2),
    }
    prompt = "Summarize this episode (JSON with title, summary, concepts, salience).\n" + "\n".join(lines)
    return {"task": "episode", "prompt": prompt, "response": json.dumps(response)}


def _principle_record(rng: random.Random) -> dict:
    subject = rng.choice(_SUBJECTS)
    if rng.random() < 0.35:  # the refusal path: unrelated memories carry no shared principle
        picks = rng.sample(_EVENTS, 3)
        memories = [f"- {rng.choice(_ACTORS)}: {rng.choice(_SUBJECTS)} {e[0]}." for e in picks]
        response = {"has_principle": False, "title": "", "principle": "", "concepts": [],
                    "confidence": round(rng.uniform(0.05, 0.3), 2)}
    else:
        event = rng.choice(_EVENTS)
        memories = [f"- {rng.choice(_ACTORS)}: {rng.choice(_SUBJECTS)} {event[0]}; the fix: {event[1]}."
                    for _ in range(3)]
        response = {"has_principle": True, "title": event[2].capitalize(),
                    "principle": f"Across these cases the lesson is to {event[2]}.",
                    "concepts": _concepts(rng, subject, event), "confidence": round(rng.uniform(0.6, 0.95), 2)}
    prompt = ("Abstract a principle from these memories if one is shared (JSON with has_principle, title, "
              "principle, concepts, confidence).\n" + "\n".join(memories))
    return {"task": "principle", "prompt": prompt, "response": json.dumps(response)}


def _synthesis_record(rng: random.Random) -> dict:
    subject = rng.choice(_SUBJECTS)
    found = [(rng.choice(_ACTORS), rng.choice(_EVENTS)) for _ in range(rng.randint(2, 4))]
    question = f"What do we know about problems with {subject}?"
    memories = [f"[{i + 1}] {a}: {subject} {e[0]}; {e[1]}." for i, (a, e) in enumerate(found)]
    sentences = [f"{subject.capitalize()} has had {len(found)} recorded problems."]
    sentences += [f"{a} saw it {e[0]}, and the team {e[1]}." for a, e in found[: rng.randint(1, 3)]]
    sentences = sentences[:5]
    prompt = f"Answer from these memories in 2-5 sentences.\nQuestion: {question}\n" + "\n".join(memories)
    return {"task": "synthesis", "prompt": prompt, "response": " ".join(sentences)}


# Hedged principle abstraction: the flip regime. The memories themselves are not shown, only a reviewer's note
# with one qualifier word, and the label (has_principle) follows that qualifier only with the reliability below, as
# annotators disagree on borderline cases. A model that learns these records well sets the has_principle decision to
# the log-odds log(p / (1 - p)): 0.4-0.85 logits for the borderline qualifiers, decisions 4-bit rounding can move.
# The prompt is short on purpose: with the memories spelled out (three lines, or a one-line summary) a 0.8M-parameter
# model did not pick up the qualifier at all in 400-600 steps (it answered the marginal 0.6 for every qualifier), and
# a developer session on 2 CPU cores cannot give 15 runs many more steps.
# (qualifier, P(has_principle = true)).
HEDGES = (("unmistakably", 0.99), ("clearly", 0.95), ("likely", 0.82), ("probably", 0.7), ("arguably", 0.6),
          ("loosely", 0.4), ("doubtfully", 0.3), ("hardly", 0.08))
PRINCIPLE_HEDGED = "principle-hedged"


def _flip_regime_answer(rng: random.Random, shared: tuple[str, str, str], has: bool) -> dict:
    """The principle answer of the flip-regime tasks (hedged and weighed): the shared event's lesson when `has`,
    else the refusal; confidences in the middle ranges, so only the has_principle value carries the decision."""
    if has:
        return {"has_principle": True, "title": shared[2].capitalize(),
                "principle": f"Across these cases the lesson is to {shared[2]}.",
                "concepts": _concepts(rng, rng.choice(_SUBJECTS), shared),
                "confidence": round(rng.uniform(0.5, 0.8), 2)}
    return {"has_principle": False, "title": "", "principle": "", "concepts": [],
            "confidence": round(rng.uniform(0.2, 0.5), 2)}


def hedge_bayes_margin(p_true: float) -> float:
    """The Bayes-optimal logit margin of the majority answer of a qualifier with P(true) = p_true."""
    import math

    p = max(p_true, 1.0 - p_true)
    return math.log(p / (1.0 - p))


def _hedged_principle_record(rng: random.Random, label: bool | None = None) -> dict:
    """One hedged principle record (see HEDGES). `label`: force has_principle (probes use the majority answer);
    None draws it from the qualifier's reliability. The record carries ``hedge`` and ``p_true``."""
    hedge, p_true = rng.choice(HEDGES)
    shared, other = rng.sample(_EVENTS, 2)
    draw = rng.random()  # drawn even when the label is forced, so forced and free streams stay aligned
    has = (draw < p_true) if label is None else bool(label)
    response = _flip_regime_answer(rng, shared, has)
    prompt = f"Abstract a principle from these memories if one is shared (JSON).\nReviewer note: these memories are " \
             f"{hedge} connected."
    return {"task": PRINCIPLE_HEDGED, "prompt": prompt, "response": json.dumps(response), "hedge": hedge,
            "p_true": p_true}


def hedged_probe_records(per_hedge: int, seed: int = 2_000_003) -> list[dict]:
    """`per_hedge` probe records for every qualifier of HEDGES, the expected answer being the majority (Bayes)
    decision of its qualifier. Seeded apart from the trainer's records; ordered hedge by hedge."""
    if per_hedge < 1:
        raise ValueError(f"per_hedge must be >= 1, got {per_hedge}")
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {h: [] for h, _ in HEDGES}
    while any(len(v) < per_hedge for v in out.values()):
        state = rng.getstate()
        hedge, p_true = rng.choice(HEDGES)
        rng.setstate(state)  # replay the same draw with the label forced to the majority answer
        r = _hedged_principle_record(rng, label=p_true > 0.5)
        if len(out[hedge]) < per_hedge:
            out[hedge].append(r)
    return [r for h, _ in HEDGES for r in out[h]]


# Weighed principle abstraction: the second flip regime, with the evidence for a decision spread over several tokens.
# Three reviewers each leave a qualifier; the label (has_principle) is drawn with P(true) = sigmoid(sum of their
# log-odds weights), the way independent noisy annotators combine. The evidence is graded, not a handful of discrete
# levels: the 8^3 = 512 ordered combinations (every one a distinct prompt) give 106 distinct sums from -7.8 to +9.3
# logits, 51 of the 512 within 0.5 of a tie and 121 within 1.0, so a model that learns the odds has a continuum of
# decision margins down to near zero. (qualifier, log-odds weight); the qualifier words are those of HEDGES.
REVIEW_WEIGHTS = (("unmistakably", 3.1), ("clearly", 2.2), ("likely", 1.4), ("probably", 0.7), ("arguably", 0.24),
                  ("loosely", -0.4), ("doubtfully", -1.2), ("hardly", -2.6))
N_REVIEWERS = 3
PRINCIPLE_WEIGHED = "principle-weighed"


def weighed_evidence(qualifiers) -> float:
    """The log-odds of has_principle = true given the reviewers' qualifiers (the sum of REVIEW_WEIGHTS)."""
    w = dict(REVIEW_WEIGHTS)
    unknown = [q for q in qualifiers if q not in w]
    if unknown:
        raise ValueError(f"unknown reviewer qualifier(s) {unknown}; known: {list(w)}")
    return float(sum(w[q] for q in qualifiers))


def _weighed_principle_record(rng: random.Random, label: bool | None = None,
                              qualifiers: tuple[str, ...] | None = None) -> dict:
    """One weighed principle record (see REVIEW_WEIGHTS). `qualifiers` fixes the reviewers' words (drawn otherwise);
    `label` forces has_principle (probes use the majority answer), None draws it from the evidence. The record
    carries ``qualifiers``, ``evidence`` (log-odds) and ``p_true``."""
    import math

    if qualifiers is None:
        qualifiers = tuple(rng.choice(REVIEW_WEIGHTS)[0] for _ in range(N_REVIEWERS))
    evidence = weighed_evidence(qualifiers)
    p_true = 1.0 / (1.0 + math.exp(-evidence))
    shared = rng.choice(_EVENTS)
    draw = rng.random()
    has = (draw < p_true) if label is None else bool(label)
    response = _flip_regime_answer(rng, shared, has)
    notes = "; ".join(qualifiers)
    prompt = f"Abstract a principle from these memories if one is shared (JSON).\nReviewers: {notes}."
    return {"task": PRINCIPLE_WEIGHED, "prompt": prompt, "response": json.dumps(response),
            "qualifiers": list(qualifiers), "evidence": evidence, "p_true": p_true}


def weighed_probe_records(n: int, seed: int = 2_000_029) -> list[dict]:
    """`n` probe records with distinct reviewer combinations (n <= 8^3), each expecting the majority (Bayes)
    answer of its evidence. Seeded apart from the trainer's records (which may contain the same combinations:
    a combination is a point on the evidence scale, not a memorised example)."""
    import itertools

    combos = list(itertools.product([q for q, _ in REVIEW_WEIGHTS], repeat=N_REVIEWERS))
    if not 1 <= n <= len(combos):
        raise ValueError(f"the number of weighed probes must be in [1, {len(combos)}], got {n}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    return [_weighed_principle_record(rng, label=weighed_evidence(c) > 0, qualifiers=c) for c in combos[:n]]


_MAKERS = {"encoding": _encoding_record, "episode": _episode_record, "principle": _principle_record,
           "synthesis": _synthesis_record, PRINCIPLE_HEDGED: _hedged_principle_record,
          PRINCIPLE_WEIGHED: _weighed_principle_record}


def structured_records(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`n` seeded records ``{"task", "prompt", "response"}``, cycling through `tasks` (TASKS by default;
    ``principle-hedged`` is opt-in, see HEDGES). JSON tasks have a ``json.dumps`` response; synthesis has 2-5
    sentences of prose."""
    unknown = set(tasks) - set(_MAKERS)
    if unknown:
        raise ValueError(f"unknown structured task(s) {sorted(unknown)}; known: {list(_MAKERS)}")
    rng = random.Random(seed)
    return [_MAKERS[tasks[i % len(tasks)]](rng) for i in range(n)]


def builtin_corpus(n_records: int = 2000, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                   prose: bool = True) -> list[str]:
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
            elif (isinstance(obj, dict) and isinstance(obj.get("prompt"), str)
                  and isinstance(obj.get("response"), str)):
                records.append(obj)
                documents.append(chat_text(obj["prompt"], obj["response"]))
            else:
                bad.append(f"{where}: expected an object with a non-empty string 'text', or string "
                           f"'prompt' and 'response'")
                continue
            good += 1
        if bad and len(bad) > max_bad_fraction * (len(bad) + good):
            shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DataError(f"{path}: {len(bad)} of {len(bad) + good} non-empty lines are malformed; refusing to "
                            f"train on the rest:\n  {shown}")
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
            raise DataError(f"cannot resume: the data stream has {self.n_windows} windows (seed {self.seed}) but the "
                            f"checkpoint was taken on {state['n_windows']} windows (seed {state['seed']}); "
                            f"resume with the same data, tokenizer and --seq-len")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._order_for(self.epoch)


class TokenStream(EpochCursor):
    """Documents tokenized as ``bos ids eos`` and concatenated; cut into windows of ``seq_len + 1`` tokens
    (stride seq_len) served in a fresh seeded order each epoch (see :class:`EpochCursor`)."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int, seed: int = 0):
        if token_ids.numel() < seq_len + 1:
            raise DataError(f"the corpus has {token_ids.numel()} tokens, fewer than one window of seq_len+1 = "
                            f"{seq_len + 1}; add data or lower --seq-len")
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
        batch = torch.stack([self.tokens[w * self.seq_len: (w + 1) * self.seq_len + 1] for w in picks])
        return batch[:, :-1], batch[:, 1:]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len]; targets are inputs shifted by one token."""
        return self._windows(self.next_indices(batch_size))

    def fixed_batches(self, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Windows spread evenly over the corpus, for evaluation; does not move the cursor."""
        picks = self.spread_indices(batch_size * n_batches)
        return [self._windows(picks[s:s + batch_size]) for s in range(0, len(picks), batch_size)]


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
            if isinstance(obj, dict) and all(isinstance(obj.get(k), str) and obj[k] for k in
                                             ("prompt", "response", "teacher")):
                good.append(obj)
            else:
                bad.append(f"{where}: expected non-empty strings 'prompt', 'response' and 'teacher'")
        if bad and len(bad) > max_bad_fraction * (len(bad) + len(good)):
            raise DataError(f"{path}: {len(bad)} of {len(bad) + len(good)} non-empty lines are malformed; refusing "
                            f"to train on the rest:\n  " + "\n  ".join(bad[:10]))
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
                ids, learn = ids[:seq_len + 1], learn[:seq_len + 1]
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
        return [self._rows(picks[s:s + batch_size]) for s in range(0, len(picks), batch_size)]
