"""The synthetic task world's records: a seeded generator of records in the shapes of the seed project's task suite.

* memory *encoding* (JSON), *episode summarization* (JSON), *principle abstraction* (JSON; ``has_principle: false``
  is the refusal path) and *retrieval synthesis* (2-5 sentences of prose): :data:`TASKS`, made by
  :func:`structured_records` (one maker per task in :data:`MAKERS`);
* the two flip regimes, opt-in tasks whose has_principle decision sits near a tie: ``principle-hedged``
  (:data:`HEDGES`) and ``principle-weighed`` (:data:`REVIEW_WEIGHTS`), with their probe records.

The vocabulary the records are made of (:data:`SUBJECTS`, :data:`ACTORS`, :data:`EVENTS`, :data:`MOODS`,
:data:`KINDS`) is public: the schemas (felix.tasks.schemas) take their enum values from it, the teacher perturbations
and the edit harness (felix.tools.edit) their names and facts.
"""

from __future__ import annotations

import itertools
import json
import math
import random

TASKS = ("encoding", "episode", "principle", "synthesis")

SUBJECTS = [
    "the build pipeline",
    "the billing service",
    "the search index",
    "the mobile app release",
    "the database migration",
    "the onboarding flow",
    "the cache layer",
    "the payment retry job",
    "the nightly backup",
    "the recommendation model",
    "the API gateway",
    "the login page",
    "the analytics dashboard",
    "the email scheduler",
    "the config loader",
    "the GPU cluster",
    "the garden irrigation timer",
    "the team offsite",
    "the quarterly budget",
    "the reading group",
]
ACTORS = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Farah",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lena",
    "Maya",
    "Noor",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tomas",
]
EVENTS = [
    (
        "failed after a dependency upgrade",
        "rolled the dependency back and pinned its version",
        "pin dependencies and upgrade them deliberately",
    ),
    (
        "slowed down under peak load",
        "added an index and a read replica",
        "measure the hot path before scaling hardware",
    ),
    ("lost data during a restart", "made the writer flush before acknowledging", "acknowledge only what is durable"),
    ("produced duplicate records", "made the handler idempotent with a request key", "design retries to be idempotent"),
    ("timed out for users abroad", "moved static assets to a CDN", "serve content close to the user"),
    ("crashed on an empty input", "added validation with a clear error message", "validate inputs at the boundary"),
    ("drifted from the documentation", "generated the docs from the schema", "keep one source of truth"),
    ("ran over its deadline", "split the work into weekly milestones", "small steps expose delays early"),
    ("confused new users", "rewrote the first screen with one clear action", "reduce choices at the start"),
    ("used twice the expected memory", "streamed the file instead of loading it whole", "stream large data"),
]
MOODS = ["frustrating", "routine", "tense", "satisfying", "surprising", "tiring"]
KINDS = ["incident", "decision", "lesson", "observation", "plan"]


def concepts_of(rng: random.Random, subject: str, event: tuple[str, str, str]) -> list[str]:
    """A record's concept list: words of the subject and the event, plus two general concepts drawn from `rng`."""
    words = [w for w in (subject.split()[-1], event[0].split()[-1], max(event[1].split(), key=len)) if w.isalpha()]
    extra = rng.sample(
        [
            "reliability",
            "performance",
            "testing",
            "communication",
            "planning",
            "debugging",
            "data integrity",
            "user experience",
            "operations",
            "learning",
        ],
        2,
    )
    return list(dict.fromkeys(w.lower() for w in words + extra))


def encoding_record(rng: random.Random) -> dict:
    subject, actor, event = rng.choice(SUBJECTS), rng.choice(ACTORS), rng.choice(EVENTS)
    mood, kind = rng.choice(MOODS), rng.choice(KINDS)
    day = rng.randint(1, 28)
    observation = (
        f"On day {day}, {actor} noticed that {subject} {event[0]}. After some investigation the team "
        f"{event[1]}. It was a {mood} afternoon."
    )
    salience = round(rng.uniform(0.2, 0.95), 2)
    response = {
        "gist": f"{subject.removeprefix('the ').capitalize()} {event[0]}; fixed by a change.",
        "summary": f"{actor} found that {subject} {event[0]}; the team {event[1]}.",
        "concepts": concepts_of(rng, subject, event),
        "structured_concepts": {
            "people": [actor],
            "systems": [subject.removeprefix("the ")],
            "actions": [event[1]],
            "kind": kind,
        },
        "significance": f"Shows that teams should {event[2]}.",
        "salience": salience,
        "emotional_tone": mood,
    }
    prompt = f"Encode this observation as a memory (JSON).\nObservation: {observation}"
    return {"task": "encoding", "prompt": prompt, "response": json.dumps(response)}


def episode_record(rng: random.Random) -> dict:
    n = rng.randint(2, 4)
    subject = rng.choice(SUBJECTS)
    steps = [(rng.choice(ACTORS), rng.choice(EVENTS)) for _ in range(n)]
    lines = [f"- {a} reported that {subject} {e[0]}; they {e[1]}." for a, e in steps]
    response = {
        "title": f"Week of fixes on {subject.removeprefix('the ')}",
        "summary": " ".join(f"{a} handled a case where it {e[0]} and {e[1]}." for a, e in steps),
        "concepts": list(dict.fromkeys(c for _, e in steps for c in concepts_of(rng, subject, e)))[:6],
        "salience": round(rng.uniform(0.3, 0.9), 2),
    }
    prompt = "Summarize this episode (JSON with title, summary, concepts, salience).\n" + "\n".join(lines)
    return {"task": "episode", "prompt": prompt, "response": json.dumps(response)}


def principle_record(rng: random.Random) -> dict:
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.35:  # the refusal path: unrelated memories carry no shared principle
        picks = rng.sample(EVENTS, 3)
        memories = [f"- {rng.choice(ACTORS)}: {rng.choice(SUBJECTS)} {e[0]}." for e in picks]
        response = {
            "has_principle": False,
            "title": "",
            "principle": "",
            "concepts": [],
            "confidence": round(rng.uniform(0.05, 0.3), 2),
        }
    else:
        event = rng.choice(EVENTS)
        memories = [
            f"- {rng.choice(ACTORS)}: {rng.choice(SUBJECTS)} {event[0]}; the fix: {event[1]}." for _ in range(3)
        ]
        response = {
            "has_principle": True,
            "title": event[2].capitalize(),
            "principle": f"Across these cases the lesson is to {event[2]}.",
            "concepts": concepts_of(rng, subject, event),
            "confidence": round(rng.uniform(0.6, 0.95), 2),
        }
    prompt = (
        "Abstract a principle from these memories if one is shared (JSON with has_principle, title, "
        "principle, concepts, confidence).\n" + "\n".join(memories)
    )
    return {"task": "principle", "prompt": prompt, "response": json.dumps(response)}


def synthesis_record(rng: random.Random) -> dict:
    subject = rng.choice(SUBJECTS)
    found = [(rng.choice(ACTORS), rng.choice(EVENTS)) for _ in range(rng.randint(2, 4))]
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
HEDGES = (
    ("unmistakably", 0.99),
    ("clearly", 0.95),
    ("likely", 0.82),
    ("probably", 0.7),
    ("arguably", 0.6),
    ("loosely", 0.4),
    ("doubtfully", 0.3),
    ("hardly", 0.08),
)
PRINCIPLE_HEDGED = "principle-hedged"


def flip_regime_answer(rng: random.Random, shared: tuple[str, str, str], has: bool) -> dict:
    """The principle answer of the flip-regime tasks (hedged and weighed): the shared event's lesson when `has`,
    else the refusal; confidences in the middle ranges, so only the has_principle value carries the decision."""
    if has:
        return {
            "has_principle": True,
            "title": shared[2].capitalize(),
            "principle": f"Across these cases the lesson is to {shared[2]}.",
            "concepts": concepts_of(rng, rng.choice(SUBJECTS), shared),
            "confidence": round(rng.uniform(0.5, 0.8), 2),
        }
    return {
        "has_principle": False,
        "title": "",
        "principle": "",
        "concepts": [],
        "confidence": round(rng.uniform(0.2, 0.5), 2),
    }


def hedge_bayes_margin(p_true: float) -> float:
    """The Bayes-optimal logit margin of the majority answer of a qualifier with P(true) = p_true."""
    p = max(p_true, 1.0 - p_true)
    return math.log(p / (1.0 - p))


def hedged_principle_record(rng: random.Random, label: bool | None = None) -> dict:
    """One hedged principle record (see HEDGES). `label`: force has_principle (probes use the majority answer);
    None draws it from the qualifier's reliability. The record carries ``hedge`` and ``p_true``."""
    hedge, p_true = rng.choice(HEDGES)
    shared, other = rng.sample(EVENTS, 2)
    draw = rng.random()  # drawn even when the label is forced, so forced and free streams stay aligned
    has = (draw < p_true) if label is None else bool(label)
    response = flip_regime_answer(rng, shared, has)
    prompt = (
        f"Abstract a principle from these memories if one is shared (JSON).\nReviewer note: these memories are "
        f"{hedge} connected."
    )
    return {
        "task": PRINCIPLE_HEDGED,
        "prompt": prompt,
        "response": json.dumps(response),
        "hedge": hedge,
        "p_true": p_true,
    }


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
        r = hedged_principle_record(rng, label=p_true > 0.5)
        if len(out[hedge]) < per_hedge:
            out[hedge].append(r)
    return [r for h, _ in HEDGES for r in out[h]]


# Weighed principle abstraction: the second flip regime, with the evidence for a decision spread over several tokens.
# Three reviewers each leave a qualifier; the label (has_principle) is drawn with P(true) = sigmoid(sum of their
# log-odds weights), the way independent noisy annotators combine. The evidence is graded, not a handful of discrete
# levels: the 8^3 = 512 ordered combinations (every one a distinct prompt) give 106 distinct sums from -7.8 to +9.3
# logits, 51 of the 512 within 0.5 of a tie and 121 within 1.0, so a model that learns the odds has a continuum of
# decision margins down to near zero. (qualifier, log-odds weight); the qualifier words are those of HEDGES.
REVIEW_WEIGHTS = (
    ("unmistakably", 3.1),
    ("clearly", 2.2),
    ("likely", 1.4),
    ("probably", 0.7),
    ("arguably", 0.24),
    ("loosely", -0.4),
    ("doubtfully", -1.2),
    ("hardly", -2.6),
)
N_REVIEWERS = 3
PRINCIPLE_WEIGHED = "principle-weighed"


def weighed_evidence(qualifiers) -> float:
    """The log-odds of has_principle = true given the reviewers' qualifiers (the sum of REVIEW_WEIGHTS)."""
    w = dict(REVIEW_WEIGHTS)
    unknown = [q for q in qualifiers if q not in w]
    if unknown:
        raise ValueError(f"unknown reviewer qualifier(s) {unknown}; known: {list(w)}")
    return float(sum(w[q] for q in qualifiers))


def weighed_principle_record(
    rng: random.Random, label: bool | None = None, qualifiers: tuple[str, ...] | None = None
) -> dict:
    """One weighed principle record (see REVIEW_WEIGHTS). `qualifiers` fixes the reviewers' words (drawn otherwise);
    `label` forces has_principle (probes use the majority answer), None draws it from the evidence. The record
    carries ``qualifiers``, ``evidence`` (log-odds) and ``p_true``."""
    if qualifiers is None:
        qualifiers = tuple(rng.choice(REVIEW_WEIGHTS)[0] for _ in range(N_REVIEWERS))
    evidence = weighed_evidence(qualifiers)
    p_true = 1.0 / (1.0 + math.exp(-evidence))
    shared = rng.choice(EVENTS)
    draw = rng.random()
    has = (draw < p_true) if label is None else bool(label)
    response = flip_regime_answer(rng, shared, has)
    notes = "; ".join(qualifiers)
    prompt = f"Abstract a principle from these memories if one is shared (JSON).\nReviewers: {notes}."
    return {
        "task": PRINCIPLE_WEIGHED,
        "prompt": prompt,
        "response": json.dumps(response),
        "qualifiers": list(qualifiers),
        "evidence": evidence,
        "p_true": p_true,
    }


def weighed_probe_records(n: int, seed: int = 2_000_029) -> list[dict]:
    """`n` probe records with distinct reviewer combinations (n <= 8^3), each expecting the majority (Bayes)
    answer of its evidence. Seeded apart from the trainer's records (which may contain the same combinations:
    a combination is a point on the evidence scale, not a memorised example)."""
    combos = list(itertools.product([q for q, _ in REVIEW_WEIGHTS], repeat=N_REVIEWERS))
    if not 1 <= n <= len(combos):
        raise ValueError(f"the number of weighed probes must be in [1, {len(combos)}], got {n}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    return [weighed_principle_record(rng, label=weighed_evidence(c) > 0, qualifiers=c) for c in combos[:n]]


# task name -> record maker (rng -> record); structured_records draws from it
MAKERS = {
    "encoding": encoding_record,
    "episode": episode_record,
    "principle": principle_record,
    "synthesis": synthesis_record,
    PRINCIPLE_HEDGED: hedged_principle_record,
    PRINCIPLE_WEIGHED: weighed_principle_record,
}


def structured_records(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`n` seeded records ``{"task", "prompt", "response"}``, cycling through `tasks` (TASKS by default;
    ``principle-hedged`` is opt-in, see HEDGES). JSON tasks have a ``json.dumps`` response; synthesis has 2-5
    sentences of prose."""
    unknown = set(tasks) - set(MAKERS)
    if unknown:
        raise ValueError(f"unknown structured task(s) {sorted(unknown)}; known: {list(MAKERS)}")
    rng = random.Random(seed)
    return [MAKERS[tasks[i % len(tasks)]](rng) for i in range(n)]
