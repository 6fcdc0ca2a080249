"""Streams documents into fixed-shape batches of segments, one document per row at a time.

A document with bytes b_0..b_{L-1} becomes the token sequence t = [BOS, b_0, ..., b_{L-1}].
A row at offset `pos` emits inputs t[pos:pos+N] and targets t[pos+1:pos+N+1] (so consecutive
segments overlap by one token), then advances pos by N. The tail of the last segment of a
document is padded (PAD inputs and targets, weight 0). When a document is finished, the row
starts its next document on the next step, with `reset` set for that step.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from memtx.data.corpus import CorpusError, Document, read_document
from memtx.data.tokenizer import BOS_ID, PAD_ID, encode

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
ReadFn = Callable[[Document], bytes]

_STATE_VERSION = 1
_NO_DOC = -1
# State entries that must match this stream for restore() to be exact.
_CHECKED_KEYS = frozenset(
    {"batch_size", "num_docs", "docs_digest", "shuffle", "repeat", "seed", "shard_index", "num_shards"}
)


def _safe_read(read_fn: ReadFn, doc: Document) -> bytes:
    """`read_fn(doc)`, or b"" (with a logged warning) if it raises OSError."""
    try:
        return read_fn(doc)
    except OSError as e:
        logger.warning("cannot read document %r: %s", doc.path, e)
        return b""


def count_tokens(docs: Sequence[Document], read_fn: ReadFn = read_document) -> int:
    """Total number of bytes of `docs`, i.e. the number of tokens predicted when streaming them."""
    return sum(len(_safe_read(read_fn, doc)) for doc in docs)


def _docs_digest(docs: Sequence[Document]) -> str:
    """A short fingerprint of the document list, to check that a state fits the stream."""
    h = hashlib.sha1()
    for doc in docs:
        h.update(doc.relpath.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def _tokens(data: bytes) -> np.ndarray:
    """The token sequence [BOS, bytes...] of a document, as int32."""
    tokens = np.empty(len(data) + 1, dtype=np.int32)
    tokens[0] = BOS_ID
    tokens[1:] = encode(data)
    return tokens


class DocumentStream:
    """Streams documents into `batch_size` rows of `seq_len`-token segments.

    Training mode (`shuffle=True, repeat=True`): an endless sequence of epochs; epoch e visits
    this shard's documents in the order `np.random.default_rng([seed, e]).permutation(n)`.
    Evaluation mode (`shuffle=False, repeat=False`): the documents in the given order, once;
    rows with nothing left to read are idle (all padding, weight 0, reset=False) and the
    stream ends once every row is idle.

    Rows take the next document of the shared draw order when they need one, row 0 first.
    Documents with zero bytes are skipped, and so are unreadable ones (`read_fn` returning
    b"" or raising OSError, which is logged). Only documents whose index i in `docs` has
    `i % num_shards == shard_index` are used. Only each row's current document is kept in
    memory; `state()`/`restore()` resume the stream exactly.
    """

    def __init__(
        self,
        docs: Sequence[Document],
        batch_size: int,
        seq_len: int,
        *,
        shuffle: bool,
        seed: int = 0,
        repeat: bool,
        shard_index: int = 0,
        num_shards: int = 1,
        read_fn: ReadFn = read_document,
        state: dict[str, Any] | None = None,
    ) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if num_shards <= 0 or not 0 <= shard_index < num_shards:
            raise ValueError(f"invalid shard {shard_index} of {num_shards} shards")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.shuffle = shuffle
        self.seed = seed
        self.repeat = repeat
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._read_fn = read_fn
        self._docs: list[Document] = list(docs)[shard_index::num_shards]
        if repeat and not self._docs:
            raise CorpusError(f"shard {shard_index} of {num_shards} has no documents")
        self._digest = _docs_digest(self._docs)
        self._perm_epoch = -1
        self._perm = np.arange(0)
        self._next_doc = 0
        self._row_doc = [_NO_DOC] * batch_size
        self._row_pos = [0] * batch_size
        self._row_tokens: list[np.ndarray | None] = [None] * batch_size
        if state is not None:
            self.restore(state)

    @property
    def num_docs(self) -> int:
        """Number of documents in this shard."""
        return len(self._docs)

    @property
    def epoch(self) -> int:
        """Epoch of the next document to be drawn."""
        return self._next_doc // max(self.num_docs, 1)

    @property
    def documents(self) -> list[Document]:
        """This shard's documents, in the given order."""
        return list(self._docs)

    def current_documents(self) -> list[Document | None]:
        """The document each row is currently streaming (None where the row has none)."""
        return [None if i == _NO_DOC else self._docs[i] for i in self._row_doc]

    # ----------------------------------------------------------------- drawing documents

    def _doc_index(self, k: int) -> int:
        """Index (into this shard's documents) of the k-th drawn document."""
        n = self.num_docs
        epoch, offset = divmod(k, n)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def _draw(self) -> tuple[int, np.ndarray | None]:
        """Draw the next non-empty document: (index, tokens), or (-1, None) if none is left."""
        n = self.num_docs
        empty_draws = 0
        while self.repeat or self._next_doc < n:
            index = self._doc_index(self._next_doc)
            self._next_doc += 1
            data = _safe_read(self._read_fn, self._docs[index])
            if data:
                return index, _tokens(data)
            empty_draws += 1
            if empty_draws >= 2 * n:  # a whole epoch lies within 2n consecutive draws
                raise CorpusError(
                    f"shard {self.shard_index} of {self.num_shards}: all {n} documents are empty"
                )
        return _NO_DOC, None

    # ----------------------------------------------------------------------- batches

    def next_batch(self) -> Batch | None:
        """The next batch, or None once a non-repeating stream is exhausted.

        Returns `inputs`, `targets` (int32 [B, N]), `weights` (float32 [B, N]) and
        `reset` (bool [B], true on the first segment of each document of a row).
        """
        B, N = self.batch_size, self.seq_len
        for row in range(B):
            if self._row_doc[row] == _NO_DOC:
                self._row_doc[row], self._row_tokens[row] = self._draw()
                self._row_pos[row] = 0
        if all(i == _NO_DOC for i in self._row_doc):
            return None

        inputs = np.full((B, N), PAD_ID, dtype=np.int32)
        targets = np.full((B, N), PAD_ID, dtype=np.int32)
        weights = np.zeros((B, N), dtype=np.float32)
        reset = np.zeros((B,), dtype=bool)
        for row in range(B):
            tokens = self._row_tokens[row]
            if tokens is None:
                continue
            pos = self._row_pos[row]
            m = min(N, len(tokens) - 1 - pos)
            inputs[row, :m] = tokens[pos : pos + m]
            targets[row, :m] = tokens[pos + 1 : pos + 1 + m]
            weights[row, :m] = 1.0
            reset[row] = pos == 0
            pos += N
            if pos >= len(tokens) - 1:
                self._row_doc[row], self._row_tokens[row], pos = _NO_DOC, None, 0
            self._row_pos[row] = pos
        return {"inputs": inputs, "targets": targets, "weights": weights, "reset": reset}

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

        `next_doc` counts documents drawn so far (across epochs: epoch = next_doc // num_docs);
        `row_doc[r]` is row r's current document index in this shard (-1: none, the row draws
        one on the next step) and `row_pos[r]` its token offset in [BOS, bytes...].
        """
        return {
            "version": _STATE_VERSION,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_docs": self.num_docs,
            "docs_digest": self._digest,
            "shuffle": bool(self.shuffle),
            "repeat": bool(self.repeat),
            "seed": int(self.seed),
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "next_doc": self._next_doc,
            "row_doc": list(self._row_doc),
            "row_pos": list(self._row_pos),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from `state()`; re-reads each row's current document.

        Raises ValueError if the state was taken from a stream with different documents,
        batch size, order settings or sharding. `seq_len` may differ (offsets are in tokens).
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported stream state version {state.get('version')!r}")
        expected = {k: v for k, v in self.state().items() if k in _CHECKED_KEYS}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"stream state has {key}={state.get(key)!r}, but this stream has {value!r}")
        row_doc, row_pos, next_doc = list(state["row_doc"]), list(state["row_pos"]), int(state["next_doc"])
        n = self.num_docs
        if (
            len(row_doc) != self.batch_size
            or len(row_pos) != self.batch_size
            or next_doc < 0
            or (not self.repeat and next_doc > n)
            or any(not _NO_DOC <= int(i) < n for i in row_doc)
            or any(int(p) < 0 for p in row_pos)
        ):
            raise ValueError("stream state has inconsistent next_doc/row_doc/row_pos values")

        self._next_doc = next_doc
        self._row_doc = [int(i) for i in row_doc]
        self._row_pos = [int(p) for p in row_pos]
        self._row_tokens = [None] * self.batch_size
        for row, index in enumerate(self._row_doc):
            if index == _NO_DOC:
                self._row_pos[row] = 0
                continue
            tokens = _tokens(_safe_read(self._read_fn, self._docs[index]))
            if self._row_pos[row] >= len(tokens) - 1:
                logger.warning(
                    "document %r is shorter than its saved offset %d; starting a new one",
                    self._docs[index].path,
                    self._row_pos[row],
                )
                self._row_doc[row], self._row_pos[row] = _NO_DOC, 0
                continue
            self._row_tokens[row] = tokens
