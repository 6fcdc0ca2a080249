"""Streams documents into fixed-shape batches of segments, one document per row at a time.

A document with token ids x_0..x_{L-1} becomes t = [BOS, x_0, ..., x_{L-1}]. A row at offset
`pos` emits inputs t[pos:pos+N] and targets t[pos+1:pos+N+1] (so consecutive segments overlap
by one token), then advances pos by N. The tail of the last segment of a document is padded
(PAD inputs and targets, weight 0). When a document is finished, the row starts its next
document on the next step, with `reset` set for that step (spec §0).

Where the documents come from is a `DocumentSource` (memtx/data/sources.py: files on disk;
memtx/data/seqio_source.py: seqio tasks): it yields each document with its position
(epoch, index) in a deterministic draw order. The stream's state names positions, not
documents, so it is small, JSON-serialisable and the same for every source.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from memtx import batch as batch_layout
from memtx.data.sources import DocumentSource, Position

Batch = dict[str, np.ndarray]
LossMask = Callable[[np.ndarray], np.ndarray]  # a document's ids -> each target's loss weight

_STATE_VERSION = 2


class DocumentStream:
    """Streams `source`'s documents into `batch_size` rows of `seq_len`-token segments.

    Rows take the next document of the source's draw order when they need one, row 0 first.
    Empty documents are skipped; so are unreadable, corrupt or undecodable ones (the source
    yields None for them), which are counted in `skipped`. A non-repeating source ends: rows
    with nothing left to read are idle (all padding, weight 0, reset=False) and the stream
    ends (next_batch() returns None) once every row is idle. Only each row's current document
    is kept in memory; `state()`/`restore()` resume the stream exactly.
    """

    def __init__(self, source: DocumentSource, batch_size: int, seq_len: int, *,
                 state: dict[str, Any] | None = None, count_bytes: bool = False,
                 loss_mask: LossMask | None = None) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        self.source = source
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.skipped = 0  # documents skipped as unreadable, corrupt or undecodable
        self.documents_started = 0
        # count_bytes: bytes of the text those ids stand for (the vocabulary decodes them; for
        # bits per byte with any vocabulary). Off in training: decoding costs time there.
        self.count_bytes, self.bytes_drawn = count_bytes, 0
        # loss_mask(ids) -> float32 [len(ids)]: each target's loss weight (None: every valid target 1)
        self.loss_mask = loss_mask
        self._row_mask: list[np.ndarray | None] = [None] * batch_size
        self._next: Position = (0, 0)  # draw position of the next document
        self._row_doc: list[Position | None] = [None] * batch_size
        self._row_pos = [0] * batch_size
        self._row_tokens: list[np.ndarray | None] = [None] * batch_size
        # What the last batch holds, per row: (document position, index of its first target in the
        # document's ids, number of targets, the ids), or None for an idle row.
        self.last_segments: list[tuple[Position, int, int, np.ndarray] | None] = [None] * batch_size
        self._iter: Iterator | None = None
        self._ended = False
        if state is not None:
            self.restore(state)

    @property
    def epoch(self) -> int:
        """Epoch of the next document to be drawn."""
        epoch, index = self._next
        return epoch + 1 if self.source.num_docs is not None and index >= self.source.num_docs else epoch

    # ----------------------------------------------------------------- drawing documents

    def _with_bos(self, ids: np.ndarray) -> np.ndarray:
        tokens = np.empty(len(ids) + 1, dtype=np.int32)
        tokens[0] = self.source.vocab.bos_id
        tokens[1:] = ids
        return tokens

    def _draw(self) -> tuple[Position | None, np.ndarray | None]:
        """The next usable document: (position, tokens with BOS), or (None, None) at the end."""
        if self._ended:
            return None, None
        if self._iter is None:
            self._iter = self.source.documents(*self._next)
        for epoch, index, ids in self._iter:
            self._next = (epoch, index + 1)
            if ids is None:
                self.skipped += 1
            elif len(ids):
                self.documents_started += 1
                if self.count_bytes:
                    self.bytes_drawn += len(self.source.vocab.decode(ids))
                return (epoch, index), self._with_bos(ids)
        self._ended = True
        return None, None

    # ----------------------------------------------------------------------- batches

    def next_batch(self) -> Batch | None:
        """The next batch, or None once a non-repeating stream is exhausted.

        Returns `inputs`, `targets` (int32 [B, N]), `weights` (float32 [B, N]), `reset`
        (bool [B], true on the first segment of each document of a row) and `loss_weights`
        (float32 [B, N]: the loss mask at the targets, or `weights` without one).
        """
        B, N = self.batch_size, self.seq_len
        for row in range(B):
            if self._row_doc[row] is None:
                self._row_doc[row], self._row_tokens[row] = self._draw()
                self._row_pos[row] = 0
        if all(p is None for p in self._row_doc):
            return None

        batch = batch_layout.empty(B, N, self.source.vocab.pad_id)
        inputs, targets, weights, reset, loss_weights = (batch[key] for key in batch_layout.KEYS)
        self.last_segments = [None] * B
        for row in range(B):
            tokens = self._row_tokens[row]
            if tokens is None:
                continue
            pos = self._row_pos[row]
            m = min(N, len(tokens) - 1 - pos)
            self.last_segments[row] = (self._row_doc[row], pos, m, tokens[1:])
            inputs[row, :m] = tokens[pos : pos + m]
            targets[row, :m] = tokens[pos + 1 : pos + 1 + m]
            weights[row, :m] = 1.0
            if self.loss_mask is None:
                loss_weights[row, :m] = 1.0
            else:  # targets are ids[pos:pos+m]
                if self._row_mask[row] is None:
                    self._row_mask[row] = self._mask(tokens[1:])
                loss_weights[row, :m] = self._row_mask[row][pos:pos + m]
            reset[row] = pos == 0
            pos += N
            if pos >= len(tokens) - 1:
                self._row_doc[row], self._row_tokens[row], self._row_mask[row], pos = None, None, None, 0
            self._row_pos[row] = pos
        return batch

    def _mask(self, ids: np.ndarray) -> np.ndarray:
        mask = np.asarray(self.loss_mask(ids), np.float32)
        if mask.shape != ids.shape:
            raise ValueError(f"the loss mask has shape {mask.shape} for a document of {len(ids)} tokens")
        return mask

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.next_batch()
        if batch is None:
            raise StopIteration
        return batch

    # ------------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """The stream position as plain JSON-serialisable values.

        `next` is the draw position [epoch, index] of the next document; `row_doc[r]` is the
        position of row r's current document (None: the row draws one on the next step) and
        `row_pos[r]` its token offset in [BOS, ids...]. `source` describes the source.
        """
        return {
            "version": _STATE_VERSION,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "source": self.source.describe(),
            "next": list(self._next),
            "row_doc": [None if p is None else list(p) for p in self._row_doc],
            "row_pos": list(self._row_pos),
            "skipped": self.skipped,
            "documents_started": self.documents_started,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from `state()`: re-reads the source from the earliest row's document up to
        `next`, keeping the rows' documents, and goes on from there.

        Raises ValueError (one line) if the state was taken from a stream over another source
        (documents, order settings, sharding, vocabulary) or with another batch size.
        `seq_len` may differ (offsets are in tokens).
        """
        problem = state_problem(state)
        if problem is not None:
            raise ValueError(problem)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported stream state version {state.get('version')!r} (this memtx writes "
                             f"{_STATE_VERSION}); start the run in a new work directory")
        if state.get("batch_size") != self.batch_size:
            raise ValueError(f"stream state has batch_size={state.get('batch_size')!r}, "
                             f"but this stream has {self.batch_size}")
        mine, theirs = self.source.describe(), state.get("source") or {}
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ValueError(f"stream state has source {key}={theirs.get(key)!r}, but this stream has {value!r}")
        try:
            next_pos = _position(state["next"])
            row_doc = [None if p is None else _position(p) for p in state["row_doc"]]
            row_pos = [int(p) for p in state["row_pos"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError("stream state has malformed next/row_doc/row_pos values") from None
        if (len(row_doc) != self.batch_size or len(row_pos) != self.batch_size or any(p < 0 for p in row_pos)
                or any(p is not None and p >= next_pos for p in row_doc)):
            raise ValueError("stream state has inconsistent next/row_doc/row_pos values")

        wanted = {p: row for row, p in enumerate(row_doc) if p is not None}
        tokens, it = self._read_rows(wanted, next_pos)

        self._next, self._iter, self._ended = next_pos, it, False
        self.skipped, self.documents_started = int(state.get("skipped", 0)), int(state.get("documents_started", 0))
        for row in range(self.batch_size):
            t = tokens.get(row)
            if t is not None and row_pos[row] >= len(t) - 1:
                raise ValueError(f"stream state has row {row} at offset {row_pos[row]} of a {len(t) - 1}-token "
                                 "document: the source's documents changed")
            if row_doc[row] is not None and t is None:
                raise ValueError(f"stream state has row {row} on document {list(row_doc[row])}, which the "
                                 "source no longer yields")
            self._row_doc[row], self._row_tokens[row], self._row_mask[row] = row_doc[row], t, None
            self._row_pos[row] = row_pos[row] if t is not None else 0


    def _read_rows(self, wanted: dict[Position, int], next_pos: Position) -> tuple[dict[int, np.ndarray], Iterator]:
        """({row: [BOS, ids...]} of the documents at the `wanted` positions, the source's documents
        from `next_pos` on). A source with random access (files) reads just those; another is read
        again from the earliest of them up to `next_pos` (a damaged position far ahead is slow)."""
        source = self.source
        if hasattr(source, "document"):
            missing = next((p for p in wanted if not source.has_position(*p)), None)
            if missing is None and not source.has_position(*next_pos, end=True):
                missing = next_pos
            if missing is not None:
                raise ValueError(f"stream state position {list(missing)} does not exist in the source "
                                 f"({source.num_docs} documents per epoch)")
            return ({row: self._with_bos(ids) for p, row in wanted.items()
                     if (ids := source.document(*p)) is not None and len(ids)}, source.documents(*next_pos))
        tokens: dict[int, np.ndarray] = {}
        start = min([next_pos, *wanted])
        it = source.documents(*start)
        at = start
        while at != next_pos:
            try:
                epoch, index, ids = next(it)
            except StopIteration:
                raise ValueError(f"stream state position {list(next_pos)} lies beyond the end of the source") from None
            if (epoch, index) in wanted and ids is not None and len(ids):
                tokens[wanted[(epoch, index)]] = self._with_bos(ids)
            at = (epoch, index + 1)
            if at > next_pos:
                raise ValueError(f"stream state position {list(next_pos)} does not exist in the source")
        return tokens, it


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_position(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_count(v) for v in value)


def state_problem(state) -> str | None:
    """What is wrong with one shard's saved stream state (read back from a checkpoint's `data`
    item), field by field (type, range, shape), or None. Whether it fits this stream (batch size,
    source, positions that exist) is `DocumentStream.restore`'s check."""
    if not isinstance(state, dict):
        return f"the stream state must be a JSON object, got {type(state).__name__}"
    for key in ("version", "batch_size", "seq_len", "skipped", "documents_started"):
        if key in state and not _count(state[key]):
            return f"field '{key}' must be a non-negative integer, got {state[key]!r}"[:160]
    missing = [k for k in ("version", "batch_size", "next", "row_doc", "row_pos") if k not in state]
    if missing:
        return f"field '{missing[0]}' is missing"
    if "source" in state and not isinstance(state["source"], dict):
        return f"field 'source' must be an object, got {type(state['source']).__name__}"
    if not _is_position(state["next"]):
        return f"field 'next' must be [epoch, index] (non-negative integers), got {state['next']!r}"[:160]
    for key, ok, what in (("row_doc", lambda p: p is None or _is_position(p), "null or [epoch, index]"),
                          ("row_pos", _count, "a non-negative integer")):
        value = state[key]
        if not isinstance(value, list) or len(value) != state["batch_size"]:
            return f"field '{key}' must be a list of batch_size={state['batch_size']} entries"
        bad = next((v for v in value if not ok(v)), ...)
        if bad is not ...:
            return f"field '{key}' must hold {what} per row, got {bad!r}"[:160]
    return None


def _position(value) -> Position:
    epoch, index = value
    return int(epoch), int(index)


class ShardedStream:
    """One process's rows of the global batch, from `num_shards` disjoint document shards.

    Shard s streams source `source_fn(s, num_shards)` into `batch_size / num_shards` rows;
    process p of n owns shards p*k .. p*k+k-1 (k = num_shards / n) and concatenates their
    batches row-wise, which is its block of the global batch. The global batches depend on
    `num_shards`, not on the number of processes: one process with 2 shards streams exactly
    what 2 processes with 1 shard each do, and a checkpoint resumes on any process count that
    divides `num_shards`.
    """

    def __init__(self, source_fn, batch_size: int, seq_len: int, *, num_shards: int, process_index: int = 0,
                 process_count: int = 1, loss_mask: LossMask | None = None) -> None:
        if num_shards % process_count or batch_size % num_shards:
            raise ValueError(f"{num_shards} data shards must be a multiple of the {process_count} processes and "
                             f"divide the batch of {batch_size} rows")
        k = num_shards // process_count
        self.shards = list(range(process_index * k, (process_index + 1) * k))
        self.num_shards = num_shards
        self.streams = [DocumentStream(source_fn(s, num_shards), batch_size // num_shards, seq_len,
                                       loss_mask=loss_mask) for s in self.shards]

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.streams)

    @property
    def source(self):
        return self.streams[0].source

    def next_batch(self) -> Batch:
        batches = [s.next_batch() for s in self.streams]  # training sources repeat: never None
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def state(self) -> dict[str, Any]:
        """{shard index (str): that shard's stream state} for this process's shards."""
        return {str(s): stream.state() for s, stream in zip(self.shards, self.streams)}

    def restore(self, states: dict[str, Any]) -> None:
        """Resume from the states of all shards (every process's `state()`, merged)."""
        if not isinstance(states, dict) or not all(isinstance(k, str) for k in states):
            raise ValueError("it must be an object {\"shards\": {shard: stream state}}, got "
                             + ("no shards" if states is None else type(states).__name__))
        if len(states) != self.num_shards:
            raise ValueError(f"the saved data stream has {len(states)} shards and this run {self.num_shards}: set "
                             f"data.shards={len(states)} to resume it on a different number of processes")
        for s, stream in zip(self.shards, self.streams):
            if str(s) not in states:
                raise ValueError(f"the saved data stream has no shard {s} (it has {sorted(states)[:4]})")
            try:
                stream.restore(states[str(s)])
            except ValueError as e:
                raise ValueError(f"shard {s}: {e}") from None
