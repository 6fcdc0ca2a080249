"""Where the loss is: per document, by position in the document, and by copyability.

Every scored target token x_t (t = its index in the document's token ids, BOS not counted) falls in
- a position bucket: t < 512, 512 <= t < 2K, 2K <= t < 8K, t >= 8K;
- a copyability bucket, from its preceding n-gram x_{t-n}..x_{t-1} and the distance d = t - t' back
  to that n-gram's latest earlier occurrence (ending just before t' < t) in the same document:
  `local` if d <= local_window (what the model attends to without a long-term memory:
  segment + memory length), `far` if local_window < d <= far_reach, `never` otherwise (no earlier
  occurrence, or t < n, or further than far_reach).
The buckets depend on the documents' token ids alone, so runs evaluated with the same
local_window and far_reach on the same documents put the same tokens in the same buckets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

POSITION_EDGES = (512, 2048, 8192)
POSITION_BUCKETS = ("<512", "512-2K", "2K-8K", ">=8K")
COPY_BUCKETS = ("local", "far", "never")
DEFAULT_NGRAM = 8
DEFAULT_FAR_REACH = 4096
_NEVER = -1


class Segment(NamedTuple):
    """One row's part of an evaluated segment: `length` targets starting at index `offset` of
    document `doc`'s token ids `ids`."""

    doc: int
    offset: int
    length: int
    ids: np.ndarray


def copy_distance(ids: np.ndarray, n: int = DEFAULT_NGRAM) -> np.ndarray:
    """int64 [L]: for each target index t, t minus the latest t' < t whose preceding n tokens equal
    t's preceding n tokens; -1 where there is none (or t < n). One pass over the document: rolling
    64-bit hashes of the n-grams (exact for bytes and n <= 8), sorted stably."""
    ids = np.asarray(ids)
    L = len(ids)
    out = np.full(L, _NEVER, np.int64)
    if n < 1:
        raise ValueError(f"the copy n-gram must have at least 1 token, got {n}")
    if L <= n:
        return out
    values = ids.astype(np.uint64)
    width = max(int(ids.max()).bit_length(), 1)
    exact = width * n <= 64  # the n-gram packed into 64 bits: no collisions
    shift, mult = np.uint64(width), np.uint64(0x9E3779B97F4A7C15)
    # h[t - n] for t = n..L-1: the n-gram ids[t-n:t] that precedes target t
    h = np.zeros(L - n, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            part = values[k:L - n + k]
            h = (h << shift) | part if exact else (h ^ part) * mult
    order = np.argsort(h, kind="stable")  # equal hashes keep increasing t
    same = h[order[1:]] == h[order[:-1]]
    later, earlier = order[1:][same], order[:-1][same]
    out[n + later] = later - earlier
    return out


def copy_buckets(ids: np.ndarray, local_window: int, far_reach: int, n: int = DEFAULT_NGRAM) -> np.ndarray:
    """int8 [L]: the index into COPY_BUCKETS of each target of the document `ids`."""
    d = copy_distance(ids, n)
    out = np.full(len(d), 2, np.int8)
    out[(d > local_window) & (d <= far_reach)] = 1
    out[(d > 0) & (d <= local_window)] = 0
    return out


def position_buckets(t: np.ndarray) -> np.ndarray:
    """The index into POSITION_BUCKETS of target indices `t`."""
    return np.searchsorted(POSITION_EDGES, t, side="right")


class LossBreakdown:
    """Accumulates per-token NLL per document, position bucket and copyability bucket."""

    def __init__(self, local_window: int, far_reach: int = DEFAULT_FAR_REACH, ngram: int = DEFAULT_NGRAM):
        if local_window < 0 or far_reach < 0 or ngram < 1:
            raise ValueError(f"invalid local window {local_window}, far reach {far_reach} or n-gram {ngram}")
        self.local_window, self.far_reach, self.ngram = local_window, far_reach, ngram
        self.doc_nll: dict[int, float] = {}
        self.doc_tokens: dict[int, int] = {}
        self.position_nll = np.zeros(len(POSITION_BUCKETS))
        self.position_tokens = np.zeros(len(POSITION_BUCKETS))
        self.copy_nll = np.zeros(len(COPY_BUCKETS))
        self.copy_tokens = np.zeros(len(COPY_BUCKETS))
        self._buckets: dict[int, tuple[int, np.ndarray]] = {}  # row -> (document, its copy buckets)

    def add(self, segments: list[Segment | None], nll_BN: np.ndarray) -> None:
        """One evaluated segment: row r's scored NLLs are nll_BN[r, :segments[r].length]."""
        for row, seg in enumerate(segments):
            if seg is None or not seg.length:
                continue
            cached = self._buckets.get(row)
            if cached is None or cached[0] != seg.doc:
                cached = self._buckets[row] = (seg.doc, copy_buckets(seg.ids, self.local_window, self.far_reach,
                                                                     self.ngram))
            nll = np.asarray(nll_BN[row, :seg.length], np.float64)
            t = seg.offset + np.arange(seg.length)
            self.doc_nll[seg.doc] = self.doc_nll.get(seg.doc, 0.0) + float(nll.sum())
            self.doc_tokens[seg.doc] = self.doc_tokens.get(seg.doc, 0) + seg.length
            pos = position_buckets(t)
            self.position_nll += np.bincount(pos, nll, len(POSITION_BUCKETS))
            self.position_tokens += np.bincount(pos, minlength=len(POSITION_BUCKETS))
            copy = cached[1][t]
            self.copy_nll += np.bincount(copy, nll, len(COPY_BUCKETS))
            self.copy_tokens += np.bincount(copy, minlength=len(COPY_BUCKETS))

    def gather(self) -> None:
        """With several processes: every process's documents and bucket sums, on every process."""
        import jax
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils as mh
        ids = np.array(list(self.doc_nll), np.int64)
        count = int(mh.process_allgather(np.array([len(ids)])).max())
        pad = lambda x: np.concatenate([x, np.full(count - len(x), -1, x.dtype)])  # noqa: E731
        all_ids = mh.process_allgather(pad(ids)).reshape(-1)
        all_nll = mh.process_allgather(pad(np.array([self.doc_nll[i] for i in ids], np.float64))).reshape(-1)
        all_tok = mh.process_allgather(pad(np.array([self.doc_tokens[i] for i in ids], np.int64))).reshape(-1)
        keep = all_ids >= 0
        self.doc_nll = dict(zip(all_ids[keep].tolist(), all_nll[keep].tolist()))
        self.doc_tokens = dict(zip(all_ids[keep].tolist(), all_tok[keep].tolist()))
        for name in ("position_nll", "position_tokens", "copy_nll", "copy_tokens"):
            setattr(self, name, mh.process_allgather(getattr(self, name)).sum(axis=0))

    def result(self) -> dict:
        """JSON-ready: `documents_nll` (parallel lists by document id, in evaluation order),
        `loss_by_position` and `loss_by_copyability` ({bucket: {nll: mean nats/token or None, tokens}})."""
        ids = sorted(self.doc_nll)
        buckets = lambda names, nll, tok: {  # noqa: E731
            name: {"nll": float(s / c) if c else None, "tokens": int(c)} for name, s, c in zip(names, nll, tok)}
        return {"documents_nll": {"id": ids, "nll": [self.doc_nll[i] for i in ids],
                                  "tokens": [int(self.doc_tokens[i]) for i in ids]},
                "loss_by_position": buckets(POSITION_BUCKETS, self.position_nll, self.position_tokens),
                "loss_by_copyability": buckets(COPY_BUCKETS, self.copy_nll, self.copy_tokens),
                "copyability": {"local_window": self.local_window, "far_reach": self.far_reach, "ngram": self.ngram}}
