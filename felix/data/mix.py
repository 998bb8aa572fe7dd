"""Weighted data mixes over prepared token shards: which (source, window) every training sample reads.

A run trains on S sources (prepared corpora, felix.data.shards) with weights w_i (fractions of training samples, hence
of training tokens: every sample is one window of ``seq_len + 1`` tokens). The trainer asks for samples by a GLOBAL
sample index ``g = ((step * world_size * grad_accum) + micro_batch) * batch_size + row`` and this module answers,
deterministically from the seed and in O(1) time and memory per lookup (nothing is materialized per window or per
sample), so that

* resume is exact and needs no replay: the data position is the single integer g;
* each torchrun rank reads only its own micro-batches (disjoint sample indices, felix/train/distributed.py);
* the realized fractions follow the weights as tightly as integers allow.

Two parts:

:class:`MixSchedule` -- which source sample g comes from. Each source i gets an integer quota p_i (the weights
apportioned to ``QUOTA_TOTAL`` by largest remainder) and its k-th sample is *due* at time (k + 1/2) / p_i; samples
are served in order of due time, ties to the lower source index (the Sainte-Lague / Webster sequence, or stride
scheduling). Among the first n samples source i then has n * w_i +- (S - 1/2) samples at EVERY prefix n (see
:meth:`MixSchedule.counts` for the derivation), e.g. within 1% of its weight after 300 samples of a 3-source mix.
Exact integer arithmetic: the order is the same on every machine.

:class:`WindowPermutation` -- which window of source i its k-th sample reads. Source i has N_i windows (stride
seq_len, as felix.data.corpus.TokenStream); sample k reads window ``perm_(i, e)(k mod N_i)`` in epoch ``e = k // N_i``,
where perm is a keyed Feistel bijection on [0, N_i) (cycle walking over the next power of 4), keyed by (seed,
source, epoch). Every window is read once per epoch, in a fresh order each epoch, and a small source wraps (starts
its next epoch) sooner than a large one: :meth:`MixSampler.epochs` tracks it per source.

:class:`MixStream` serves [batch, seq_len] int64 (inputs, targets) batches from the sources' token arrays (anything
with ``n_tokens`` and ``read(start, length)``, e.g. felix.data.shards.TokenArray): memory-mapped reads, no per-token
Python objects, so the loader's memory does not grow with the corpus.
"""

from __future__ import annotations

import math

import numpy as np
import torch

QUOTA_TOTAL = 1 << 20  # weights are apportioned to integer quotas summing to this (resolution ~1e-6)
_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 4


class MixError(ValueError):
    """A data mix cannot be used (bad weights, a source too small, a resume on different data)."""


def normalize_weights(weights, names=None) -> list[float]:
    """Weights as fractions summing to 1. Negative, non-finite or all-zero weights are refused, naming the sources
    (`names`, else their positions)."""
    weights = [float(w) for w in weights]
    names = list(names) if names is not None else [f"source {i}" for i in range(len(weights))]
    if not weights:
        raise MixError("a data mix needs at least one source")
    if len(names) != len(weights):
        raise MixError(f"{len(weights)} weights for {len(names)} sources ({', '.join(names)})")
    bad = [f"{n}: {w!r}" for n, w in zip(names, weights) if not math.isfinite(w) or w < 0]
    if bad:
        raise MixError("data mix weights must be finite and >= 0; got " + ", ".join(bad))
    total = sum(weights)
    if total <= 0:
        raise MixError(
            f"data mix weights sum to zero ({', '.join(names)}): at least one source needs a positive weight"
        )
    return [w / total for w in weights]


def integer_quotas(fractions, total: int = QUOTA_TOTAL) -> list[int]:
    """`fractions` (summing to 1) apportioned to integers summing to `total` by largest remainder; a positive
    fraction never gets 0 (it gets at least 1, taken from the largest quota)."""
    exact = [f * total for f in fractions]
    quotas = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and quotas[i] == 0:
            quotas[i] = 1
            quotas[max(range(len(quotas)), key=lambda j: (quotas[j], -j))] -= 1
    return quotas


class MixSchedule:
    """Global sample index -> (source, ordinal of the sample within its source), by due time (module docstring).

    Source i's k-th sample is due at (2k + 1) / (2 p_i); (i, k) comes before (j, m) iff (2k + 1) p_j < (2m + 1) p_i,
    or the two are equal and i < j. Sources with quota 0 (weight 0) never appear."""

    def __init__(self, quotas):
        self.quotas = [int(p) for p in quotas]
        if any(p < 0 for p in self.quotas) or not any(self.quotas):
            raise MixError(f"quotas must be >= 0 with at least one positive, got {self.quotas}")
        self.total = sum(self.quotas)
        self.active = [i for i, p in enumerate(self.quotas) if p > 0]

    @classmethod
    def from_weights(cls, weights, names=None) -> MixSchedule:
        return cls(integer_quotas(normalize_weights(weights, names)))

    def _before(self, j: int, i: int, k: int) -> int:
        """How many samples of source j come before source i's k-th sample."""
        if j == i:
            return k
        num, den = (2 * k + 1) * self.quotas[j], self.quotas[i]
        odd_limit = num // den if j < i else (num - 1) // den  # odd m = 2k'+1 with m/p_j before (2k+1)/p_i
        return (odd_limit + 1) // 2

    def position(self, i: int, k: int) -> int:
        """The global index of source i's k-th sample."""
        return sum(self._before(j, i, k) for j in self.active)

    def count(self, i: int, n: int) -> int:
        """Samples of source i among the first n (O(S log S): a binary search over a window of width ~2S)."""
        p = self.quotas[i]
        if p == 0 or n <= 0:
            return 0
        s = len(self.active)
        # position(i, k) = (k + 1/2) * total / p - 1/2 within +- (s - 1/2): k lies within s * p / total + 1 of
        # n * p / total; the window is widened until it brackets, so the bound is a speed-up, not an assumption.
        guess, slack = n * p // self.total, s * p // self.total + 2
        lo, hi = max(0, guess - slack), min(n, guess + slack)
        while lo > 0 and self.position(i, lo) >= n:
            lo = max(0, lo - 2 * slack)
        while self.position(i, hi) < n:
            hi = min(n, hi + 2 * slack)
        while lo < hi:  # the smallest k with position(i, k) >= n: the number of samples of i before n
            mid = (lo + hi) // 2
            if self.position(i, mid) >= n:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def counts(self, n: int) -> list[int]:
        """Samples of every source among the first n. Bound: with t = (k + 1/2) / p_i, each other source j
        contributes t * p_j within +-1/2 before (i, k), so position(i, k) = t * total - 1/2 +- (S - 1), i.e.
        |counts(n)[i] - n * p_i / total| <= S - 1/2."""
        return [self.count(i, n) for i in range(len(self.quotas))]

    def _next(self, ordinals: list[int]) -> int:
        """The source whose next sample (ordinal ordinals[i]) is due first."""
        best = None
        for i in self.active:
            if best is None or (2 * ordinals[i] + 1) * self.quotas[best] < (2 * ordinals[best] + 1) * self.quotas[i]:
                best = i
        return best

    def locate(self, g: int) -> tuple[int, int]:
        """(source, ordinal within the source) of global sample g."""
        return self.run(g, 1)[0]

    def run(self, g: int, count: int) -> list[tuple[int, int]]:
        """(source, ordinal) of samples g, g+1, ..., g+count-1: one O(S^2 log S) lookup, then O(S) per sample."""
        if g < 0 or count < 0:
            raise ValueError(f"sample index and count must be >= 0, got {g} and {count}")
        ordinals = self.counts(g)
        out = []
        for _ in range(count):
            i = self._next(ordinals)
            out.append((i, ordinals[i]))
            ordinals[i] += 1
        return out


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fast bijective mixer on 64-bit integers (Steele, Lea, Flood 2014)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, source, epoch, ...), each part mixed in."""
    key = 0x9E3779B97F4A7C15
    for p in parts:
        key = _mix64((key ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64)
    return key


class WindowPermutation:
    """A keyed bijection on [0, n): a 4-round balanced Feistel network on 2h-bit integers (4^h >= n, so the domain
    is < 4n), cycle-walked until the value falls inside [0, n) (expected < 4 rounds of walking). O(1) memory."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.round_keys = [derive_key(key, r) for r in range(_FEISTEL_ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right, mask = x >> self.half, x & self.mask, self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << self.half) | right

    def __call__(self, j: int) -> int:
        if not 0 <= j < self.n:
            raise IndexError(f"index {j} outside [0, {self.n})")
        x = self._feistel(j)
        while x >= self.n:  # cycle walking: j's cycle in the larger domain returns into [0, n)
            x = self._feistel(x)
        return x


class MixSampler:
    """Global sample index -> (source, window), from the sources' window counts, the weights and the seed."""

    def __init__(self, n_windows, weights, seed: int, names=None):
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(n_windows))]
        self.n_windows = [int(n) for n in n_windows]
        self.fractions = normalize_weights(weights, self.names)
        if len(self.n_windows) != len(self.fractions):
            raise MixError(f"{len(self.fractions)} weights for {len(self.n_windows)} sources")
        empty = [n for n, w, f in zip(self.names, self.n_windows, self.fractions) if w < 1 and f > 0]
        if empty:
            raise MixError(f"source(s) {', '.join(empty)} have no training window (fewer than seq_len + 1 tokens)")
        self.seed = int(seed)
        self.schedule = MixSchedule(integer_quotas(self.fractions))
        self._perms: dict[tuple[int, int], WindowPermutation] = {}

    def _window(self, source: int, ordinal: int) -> int:
        epoch, j = divmod(ordinal, self.n_windows[source])
        perm = self._perms.get((source, epoch))
        if perm is None:
            if len(self._perms) > 64:  # only the current epochs are ever needed again
                self._perms.clear()
            perm = self._perms[(source, epoch)] = WindowPermutation(
                self.n_windows[source], derive_key(self.seed, source, epoch)
            )
        return perm(j)

    def samples(self, g: int, count: int) -> list[tuple[int, int]]:
        """(source, window) of global samples g .. g+count-1."""
        return [(i, self._window(i, k)) for i, k in self.schedule.run(g, count)]

    def sample(self, g: int) -> tuple[int, int]:
        return self.samples(g, 1)[0]

    def counts(self, n: int) -> list[int]:
        """Samples drawn from each source among the first n."""
        return self.schedule.counts(n)

    def epochs(self, n: int) -> list[float]:
        """Passes over each source after n samples (2.5 = two full epochs and half of the third)."""
        return [c / w for c, w in zip(self.counts(n), self.n_windows)]

    def state(self) -> dict:
        """What fixes the sample order (JSON-able): a resume must find the same."""
        return {"seed": self.seed, "n_windows": self.n_windows, "quotas": self.schedule.quotas, "names": self.names}


def window_count(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len in n_tokens tokens (felix.data.corpus.TokenStream's cut)."""
    return max(0, (n_tokens - 1) // seq_len)


def read_windows(array, windows, seq_len: int) -> np.ndarray:
    """[len(windows), seq_len + 1] int64 rows: window w is tokens [w * seq_len, w * seq_len + seq_len + 1)."""
    out = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for r, w in enumerate(windows):
        out[r] = array.read(w * seq_len, seq_len + 1)
    return out


def spread_windows(n_windows: int, count: int) -> list[int]:
    """Up to `count` window indices spread evenly over [0, n_windows) (a stable evaluation sample)."""
    n = min(n_windows, count)
    if n <= 1:
        return [0] * n
    # exact integers (a float32 linspace rounds past the last window of a corpus of billions of tokens)
    return [(i * (n_windows - 1) + (n - 1) // 2) // (n - 1) for i in range(n)]


def fixed_batches(array, seq_len: int, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches of windows spread evenly over `array` (as felix.data.corpus.TokenStream.fixed_batches)."""
    picks = spread_windows(window_count(array.n_tokens, seq_len), batch_size * n_batches)
    rows = torch.from_numpy(read_windows(array, picks, seq_len))
    return [(rows[s : s + batch_size, :-1], rows[s : s + batch_size, 1:]) for s in range(0, len(picks), batch_size)]


class MixStream:
    """Training batches from a weighted mix of token arrays, at a cursor that is one integer (the global sample
    index). The trainer-facing API of felix.data.corpus.TokenStream: next_batch, skip, wraps, epoch_progress,
    state_dict / load_state_dict. `identity` (JSON-able, e.g. each source's fingerprint and tokenizer hash) is
    saved in the state; a resume on a different identity is refused, naming what changed."""

    def __init__(self, arrays, weights, seq_len: int, seed: int, names=None, identity: dict | None = None):
        self.arrays, self.seq_len = list(arrays), seq_len
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(self.arrays))]
        self.sampler = MixSampler([window_count(a.n_tokens, seq_len) for a in self.arrays], weights, seed, self.names)
        self.identity = identity or {}
        self.position = 0  # global samples consumed

    @property
    def n_windows(self) -> int:
        return sum(self.sampler.n_windows)

    @property
    def n_tokens(self) -> int:
        return sum(int(a.n_tokens) for a in self.arrays)

    def batch_at(self, g: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples g .. g+batch_size-1 as (inputs, targets), each [batch_size, seq_len] int64."""
        rows = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for r, (i, w) in enumerate(self.sampler.samples(g, batch_size)):
            rows[r] = self.arrays[i].read(w * self.seq_len, self.seq_len + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.position, batch_size)
        self.position += batch_size
        return batch

    def skip(self, batch_size: int) -> None:
        """Advance past a batch without reading it (another rank's micro-batch)."""
        self.position += batch_size

    def source_counts(self) -> dict[str, int]:
        """Samples served so far per source (the realized mix)."""
        return dict(zip(self.names, self.sampler.counts(self.position)))

    def source_epochs(self) -> dict[str, float]:
        return dict(zip(self.names, self.sampler.epochs(self.position)))

    @property
    def wraps(self) -> int:
        """Completed passes over the whole mix: the fewest completed epochs of any source with a weight."""
        return math.floor(self._least_epochs())

    @property
    def epoch_progress(self) -> float:
        return self._least_epochs() % 1.0

    def _least_epochs(self) -> float:
        return min(e for e, f in zip(self.sampler.epochs(self.position), self.sampler.fractions) if f > 0)

    def state_dict(self) -> dict:
        return {"position": self.position, "seq_len": self.seq_len, **self.sampler.state(), "identity": self.identity}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = []
        for name in sorted(set(mine["identity"]) | set(state.get("identity", {}))):
            old, new = state.get("identity", {}).get(name), mine["identity"].get(name)
            if old != new:
                if old is None or new is None:
                    changed.append(f"source {name!r} {'added' if old is None else 'removed'}")
                else:
                    changed += [
                        f"source {name!r}: {key} {old.get(key)!r} -> {new.get(key)!r}"
                        for key in sorted(set(old) | set(new))
                        if old.get(key) != new.get(key)
                    ]
        for key in ("seed", "seq_len", "names", "quotas", "n_windows"):
            if not changed and state.get(key) != mine[key]:
                changed.append(f"{key} {state.get(key)!r} -> {mine[key]!r}")
        if changed:
            raise MixError(
                "cannot resume: the training data differs from the checkpoint's: "
                + "; ".join(changed)
                + ". Resume with the data, tokenizer, weights, seed and seq_len the run started with"
            )
        self.position = int(state["position"])
