"""Loss buckets: copy distances of n-grams, local/far/never boundaries, positions, the accumulator."""

import numpy as np
import pytest

from memtx.loss_breakdown import (COPY_BUCKETS, LossBreakdown, Segment, copy_buckets, copy_distance,
                                  position_buckets)

LOCAL, FAR, NEVER = range(3)


def _brute_distance(ids, n):
    out = np.full(len(ids), -1)
    for t in range(n, len(ids)):
        for earlier in range(t - 1, n - 1, -1):
            if list(ids[earlier - n:earlier]) == list(ids[t - n:t]):
                out[t] = t - earlier
                break
    return out


def test_copy_distance_is_the_distance_to_the_latest_earlier_ngram():
    ids = np.array([5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 7])
    # (5, 6) precedes targets 2, 6 and 10
    d = copy_distance(ids, 2)
    assert d[6] == 4 and d[10] == 4 and d[2] == -1
    assert d[7] == 4  # (6, 7) precedes targets 3, 7: 4 back
    assert d[0] == d[1] == -1  # no 2-gram before them
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):
        for vocab in (2, 5, 259, 32_000):  # packed n-grams and (vocab 32K, n 8) hashed ones
            ids = rng.integers(0, vocab, 300)
            np.testing.assert_array_equal(copy_distance(ids, n), _brute_distance(ids, n))


def test_local_far_never_exactly_at_the_boundaries():
    n, window, reach = 3, 10, 20
    marker = np.array([100, 101, 102])
    for gap, expected in [(4, LOCAL), (window, LOCAL), (window + 1, FAR), (reach, FAR), (reach + 1, NEVER)]:
        # the marker, 7, filler, the marker again: the target after the second marker is `gap` after the first's
        filler = np.arange(200, 200 + gap - n - 1)
        ids = np.concatenate([marker, [7], filler, marker, [7]])
        t = len(ids) - 1
        assert copy_distance(ids, n)[t] == gap
        assert copy_buckets(ids, window, reach, n)[t] == expected, (gap, COPY_BUCKETS[expected])
    ids = np.arange(50)  # nothing repeats
    assert (copy_buckets(ids, window, reach, n) == NEVER).all()


def test_position_buckets_at_their_edges():
    t = np.array([0, 511, 512, 2047, 2048, 8191, 8192, 10**6])
    np.testing.assert_array_equal(position_buckets(t), [0, 0, 1, 1, 2, 2, 3, 3])


def test_breakdown_accumulates_documents_positions_and_buckets_over_segments():
    ids = np.tile(np.arange(8), 80)  # 640 tokens, period 8: from t = 2 + 8 on, every 2-gram was seen 8 back
    breakdown = LossBreakdown(local_window=8, far_reach=100, ngram=2)
    nll = np.arange(640, dtype=np.float64) / 640
    other = np.array([9, 9, 9, 9])
    # two rows: document 3 in 10 segments of 64 on row 0, document 5 (4 tokens) on row 1 then idle
    for s in range(10):
        segments = [Segment(3, 64 * s, 64, ids), Segment(5, 0, 4, other) if s == 0 else None]
        nll_BN = np.stack([nll[64 * s:64 * s + 64], np.full(64, 2.0) if s == 0 else np.zeros(64)])
        breakdown.add(segments, nll_BN)
    r = breakdown.result()
    assert r["documents_nll"]["id"] == [3, 5] and r["documents_nll"]["tokens"] == [640, 4]
    assert r["documents_nll"]["nll"] == pytest.approx([nll.sum(), 8.0])
    pos = r["loss_by_position"]
    assert pos["<512"]["tokens"] == 512 + 4 and pos["512-2K"]["tokens"] == 128 and pos["2K-8K"]["tokens"] == 0
    assert pos["512-2K"]["nll"] == pytest.approx(nll[512:].mean())
    copy = r["loss_by_copyability"]
    # document 3: t < 2 have no 2-gram, t in 2..9 see theirs for the first time, the rest 8 back;
    # document 5: t < 2 none, t = 2 sees (9, 9) first, t = 3 one back
    assert copy["never"]["tokens"] == 10 + 3 and copy["local"]["tokens"] == 630 + 1 and copy["far"]["tokens"] == 0
    assert copy["local"]["nll"] == pytest.approx((nll[10:].sum() + 2.0) / 631)
    assert copy["far"]["nll"] is None
    assert r["copyability"] == {"local_window": 8, "far_reach": 100, "ngram": 2}
