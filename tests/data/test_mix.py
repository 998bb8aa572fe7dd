"""Data mixes (felix/data/mix.py): the sample order against a brute-force merge of exact due times, the realized
fractions, the window permutations, random access == sequential reading, rank splits and resume."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from felix.data.mix import (
    MixError,
    MixSampler,
    MixSchedule,
    MixStream,
    WindowPermutation,
    integer_quotas,
    normalize_weights,
    spread_windows,
)


def brute_force_order(quotas, n):
    """The first n (source, ordinal) of the merged due-time sequence: source i's k-th sample due at
    (k + 1/2) / p_i, ties to the lower source, by sorting exact fractions."""
    items = sorted((Fraction(2 * k + 1, 2 * p), i, k) for i, p in enumerate(quotas) if p for k in range(n + 1))
    return [(i, k) for _, i, k in items[:n]]


def test_schedule_matches_the_brute_force_merge():
    rng = random.Random(0)
    for _ in range(60):
        quotas = [rng.choice([0, 1, 2, 3, 5, 7, 10, 100]) for _ in range(rng.randint(1, 5))]
        quotas[rng.randrange(len(quotas))] += 1
        schedule, n = MixSchedule(quotas), 300
        truth = brute_force_order(quotas, n + 5)
        assert schedule.run(0, n + 5) == truth
        for g in rng.sample(range(n), 15):  # random access: one lookup, no replay
            assert schedule.locate(g) == truth[g]
            assert schedule.run(g, 5) == truth[g : g + 5]
            assert schedule.counts(g) == [sum(1 for i, _ in truth[:g] if i == s) for s in range(len(quotas))]


def test_realized_fractions_follow_the_weights_at_every_prefix():
    for weights in ([0.7, 0.3], [0.7, 0.2, 0.1], [0.5, 0.25, 0.125, 0.125], [0.999, 0.001]):
        schedule = MixSchedule.from_weights(weights)
        s = len(weights)
        order = schedule.run(0, 2000)
        counts = [0] * s
        for n, (i, _) in enumerate(order, 1):
            counts[i] += 1
            for c, p in zip(counts, schedule.quotas):  # the derived bound (MixSchedule.counts): S - 1/2 samples
                assert abs(c - n * p / schedule.total) <= s - 0.5
        for n in (300, 500, 2000):  # "within 2% over a few hundred samples"
            realized = schedule.counts(n)
            assert all(abs(c / n - w) <= 0.02 for c, w in zip(realized, weights))
    # far out: O(1) lookups agree with the counting function
    schedule = MixSchedule.from_weights([0.7, 0.3])
    g = 10**15 + 12345
    i, k = schedule.locate(g)
    assert schedule.position(i, k) == g and schedule.counts(g)[i] == k


def test_bad_weights_are_refused():
    with pytest.raises(MixError, match="finite and >= 0; got web: -0.5"):
        normalize_weights([0.7, -0.5], ["code", "web"])
    with pytest.raises(MixError, match="sum to zero"):
        normalize_weights([0, 0.0], ["a", "b"])
    with pytest.raises(MixError, match="finite"):
        normalize_weights([float("nan"), 1])
    with pytest.raises(MixError, match="at least one source"):
        normalize_weights([])
    assert normalize_weights([3, 1]) == [0.75, 0.25]
    assert integer_quotas([1e-9, 1 - 1e-9], 1000) == [1, 999]  # a positive weight is never dropped


def test_window_permutations_are_bijections_and_differ_by_key():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        for key in (0, 1, 2**63 + 5):
            perm = WindowPermutation(n, key)
            assert sorted(perm(j) for j in range(n)) == list(range(n))
    a, b = WindowPermutation(1000, 1), WindowPermutation(1000, 2)
    assert [a(j) for j in range(1000)] != [b(j) for j in range(1000)]
    assert [a(j) for j in range(20)] != list(range(20))
    with pytest.raises(IndexError):
        a(1000)


def test_sampler_reads_every_window_once_per_epoch_and_small_sources_wrap_sooner():
    sampler = MixSampler([50, 7], [0.5, 0.5], seed=3, names=["big", "small"])
    drawn = sampler.samples(0, 700)
    for source, n in ((0, 50), (1, 7)):
        windows = [w for i, w in drawn if i == source]
        epochs = [windows[e * n : (e + 1) * n] for e in range(len(windows) // n)]
        assert epochs and all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # a fresh order each epoch
    epochs = sampler.epochs(700)
    assert epochs == [350 / 50, 350 / 7] and epochs[1] > epochs[0]
    # random access anywhere equals the sequential read
    for g in (0, 1, 99, 350, 650):
        assert sampler.samples(g, 50) == drawn[g : g + 50]
    assert MixSampler([50, 7], [0.5, 0.5], seed=4).samples(0, 100) != drawn[:100]  # the seed matters
    with pytest.raises(MixError, match="small"):
        MixSampler([50, 0], [0.5, 0.5], seed=0, names=["big", "small"])


class ArangeArray:
    """A token array whose token at position t is t (+ an offset per source): every window is recognizable."""

    def __init__(self, n_tokens, offset):
        self.n_tokens, self.offset = n_tokens, offset

    def read(self, start, length):
        assert 0 <= start and start + length <= self.n_tokens
        return np.arange(start, start + length, dtype=np.int64) + self.offset


def test_stream_batches_ranks_and_resume():
    arrays = [ArangeArray(10_001, 0), ArangeArray(1_601, 1_000_000)]
    seq_len, batch = 16, 4

    def stream():
        return MixStream(
            arrays,
            [0.7, 0.3],
            seq_len,
            seed=5,
            names=["web", "code"],
            identity={"web": {"fingerprint": "a"}, "code": {"fingerprint": "b"}},
        )

    single = stream()
    batches = [single.next_batch(batch) for _ in range(8)]
    sampler = single.sampler
    for b, (x, y) in enumerate(batches):
        assert x.dtype == torch.int64 and x.shape == (batch, seq_len) and torch.equal(x[:, 1:], y[:, :-1])
        for r, (i, w) in enumerate(sampler.samples(b * batch, batch)):
            assert x[r, 0].item() == arrays[i].offset + w * seq_len
    # two ranks, each keeping micro-batches rank, rank + 2, ... and skipping the others: disjoint, together all
    ranks = []
    for rank in range(2):
        s, got = stream(), []
        for m in range(8):
            if m % 2 == rank:
                got.append(s.next_batch(batch))
            else:
                s.skip(batch)
        ranks.append(got)
    assert all(torch.equal(ranks[m % 2][m // 2][0], batches[m][0]) for m in range(8))
    # resume: the state is one integer plus what fixes the order
    state = single.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(batch)[0], single.next_batch(batch)[0])
    assert single.source_counts() == dict(zip(["web", "code"], sampler.counts(36)))
    changed = MixStream(
        arrays,
        [0.7, 0.3],
        seq_len,
        seed=5,
        names=["web", "code"],
        identity={"web": {"fingerprint": "a"}, "code": {"fingerprint": "c"}},
    )
    with pytest.raises(MixError, match=r"source 'code': fingerprint 'b' -> 'c'"):
        changed.load_state_dict(state)
    with pytest.raises(MixError, match="seq_len 16 -> 8"):
        MixStream(arrays, [0.7, 0.3], 8, seed=5, names=["web", "code"], identity=single.identity).load_state_dict(state)


def test_spread_windows_are_exact_at_any_size():
    assert spread_windows(10, 4) == [0, 3, 6, 9] and spread_windows(3, 8) == [0, 1, 2] and spread_windows(5, 1) == [0]
    huge = 78_125_000_000  # windows of a 10-billion-token corpus at seq_len 128: float32 would round past the end
    picks = spread_windows(huge, 16)
    assert picks[0] == 0 and picks[-1] == huge - 1 and picks == sorted(set(picks))
