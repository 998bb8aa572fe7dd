"""The built-in edit set (counterfactual rewrites of facts the built-in corpus teaches), windows of corpus text
(preserved-knowledge keys, locality and validation text), and the sequential harness that applies edits one after
another and measures after each."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tqdm import tqdm

from felix.data import corpus as felix_data
from felix.tasks.records import ACTORS, EVENTS, SUBJECTS
from felix.tools.edit.edit_requests import EditRequest, tokenize_request
from felix.tools.edit.errors import EditError
from felix.tools.edit.metrics import logprobs, mean_kl, target_stats, validation_ce
from felix.tools.edit.solver import SpliceEditor


# Facts the built-in corpus teaches (felix.tasks.records.EVENTS): after "<subject> <failure>", records go on with the
# fix. The templates are the phrasings felix.data.corpus's records use.
FACT_TEMPLATES = (
    "- {actor} reported that {subject} {failure}; they",
    "{actor} found that {subject} {failure}; the team",
    "{actor}: {subject} {failure}; the fix:",
)


def fact_phrases() -> list[str]:
    """The failure phrases the built-in edit set keys on: neutral text for locality must not contain them."""
    return [e[0] for e in EVENTS]


def builtin_edit_set(model, tokenizer, n: int = 100, seed: int = 0) -> list[dict]:
    """`n` edit cases from felix.data.corpus's records: a (subject, failure) pair in one record phrasing, its fix's first
    word as the fact the corpus teaches, a counterfactual rewrite to another fix's first word, and paraphrases (the
    same pair in the other phrasings, with other people). Each case: prompt, target, true (the corpus answer),
    learned (whether the model's greedy next token is the true one), paraphrases. Targets are single tokens."""
    rng = random.Random(seed)
    events = EVENTS
    first_words = sorted({" " + e[1].split()[0] for e in events})
    single = [w for w in first_words if len(tokenizer.encode(w)) == 1]
    if len(single) < 2:
        raise EditError(
            "the tokenizer splits the fixes' first words into several tokens; the built-in edit set "
            "needs single-token targets"
        )
    pairs = [(s, e) for s in SUBJECTS for e in events if " " + e[1].split()[0] in single]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise EditError(f"the built-in edit set has {len(pairs)} distinct (subject, failure) cases, fewer than {n}")
    cases = []
    for i, (subject, event) in enumerate(pairs[:n]):
        true = " " + event[1].split()[0]
        target = rng.choice([w for w in single if w != true])
        t = i % len(FACT_TEMPLATES)
        actors = rng.sample(ACTORS, len(FACT_TEMPLATES))
        fill = lambda k: FACT_TEMPLATES[k].format(actor=actors[k], subject=subject, failure=event[0])  # noqa: E731
        cases.append(
            {
                "name": f"{subject.removeprefix('the ')} / {event[0]}",
                "prompt": fill(t),
                "target": target,
                "true": true,
                "paraphrases": [fill(k) for k in range(len(FACT_TEMPLATES)) if k != t],
            }
        )
    stats = target_stats(model, [(tokenizer.encode(c["prompt"]), tokenizer.encode(c["true"])) for c in cases])
    for c, s in zip(cases, stats):
        c["learned"] = s["top1"]
    return cases


def corpus_sequences(tokenizer, split: str, n: int, length: int, seed: int = 0, exclude=()) -> list[list[int]]:
    """`n` windows of `length` tokens from the built-in corpus's train or validation split (felix train's split
    with its defaults), evenly spread; documents containing any of the strings `exclude` are left out."""
    train, val = felix_data.split_documents(felix_data.builtin_corpus(2000, seed), 0.05, seed)
    docs = [d for d in (train if split == "train" else val) if not any(x in d for x in exclude)]
    ids = [i for d in docs for i in tokenizer.encode(d)]
    step = max(length, (len(ids) - length) // max(n, 1))
    out = [ids[s : s + length] for s in range(0, len(ids) - length, step)][:n]
    if len(out) < n:
        raise EditError(f"the {split} split holds only {len(out)} windows of {length} tokens")
    return out


# ------------------------------------------------------------------------------------- sequential harness
@dataclass
class HarnessData:
    """What the sequential harness measures on: edit cases (builtin_edit_set), neutral sequences for locality KL,
    validation windows for CE."""

    cases: list[dict]
    neutral: list[list[int]]
    validation: list[list[int]]


def run_sequential(
    editor: SpliceEditor, data: HarnessData, full_every: int = 10, progress: bool = True, desc: str = "edits"
) -> list[dict]:
    """Apply data.cases one after another; after each edit measure: efficacy (the edit's target is the argmax),
    paraphrase generalisation (the edit's paraphrases), retention (earlier edits still hold), locality (mean
    token KL from the unedited model on the neutral sequences), ||dW||_F and rank used, validation CE. Every
    `full_every` edits (and at the end) also the paraphrases of all applied edits. Returns one row per edit."""
    model, tok = editor.model, editor.tokenizer
    ref = logprobs(model, data.neutral)
    ce0 = validation_ce(model, data.validation)
    tokd = [(tokenize_request(tok, model, EditRequest(c["prompt"], c["target"]))) for c in data.cases]
    para = [[(tok.encode(p), t) for p in c["paraphrases"]] for c, (_, t) in zip(data.cases, tokd)]
    rows = []
    for i, case in enumerate(tqdm(data.cases, desc=desc, unit="edit", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        editor.apply(EditRequest(case["prompt"], case["target"], tuple(case["paraphrases"]), case["name"]))
        seconds = time.perf_counter() - t0
        held = target_stats(model, tokd[: i + 1])
        now_para = target_stats(model, para[i])
        row = {
            "edit": i + 1,
            "efficacy": float(held[-1]["top1"]),
            "target_logprob": held[-1]["logprob"],
            "paraphrase": sum(s["top1"] for s in now_para) / len(now_para),
            "retention": (sum(s["top1"] for s in held[:-1]) / i) if i else None,
            "cumulative_efficacy": sum(s["top1"] for s in held) / (i + 1),
            "locality_kl": mean_kl(model, data.neutral, ref),
            "val_ce": validation_ce(model, data.validation),
            "val_ce_change": None,
            "dW_fro": float(editor.delta().norm()),
            "rank_used": editor.rank_used(),
            "seconds": seconds,
        }
        row["val_ce_change"] = row["val_ce"] - ce0
        if (i + 1) % full_every == 0 or i + 1 == len(data.cases):
            allp = target_stats(model, [x for p in para[: i + 1] for x in p])
            row["cumulative_paraphrase"] = sum(s["top1"] for s in allp) / len(allp)
        rows.append(row)
    return rows
