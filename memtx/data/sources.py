"""Document sources: where a stream's documents come from, in a deterministic draw order.

A source yields `(epoch, index, ids)` from any position on: `ids` are a document's token ids
(int32, no BOS; empty for an empty document), or None for a document that could not be read
or tokenized (the stream skips and counts it). Training sources repeat, with a new seeded
order every epoch; evaluation sources yield every document of their shard once, in a fixed
order. A source covers one shard of the documents (`shard_index` of `num_shards`, one shard
per process), and `describe()` names everything a saved stream position depends on.

`FileSource` reads files (one file = one document) and needs no TensorFlow; seqio tasks are
read by `memtx.data.seqio_source.SeqioSource`; `memtx.data.config_source.open_source` picks one
from a config.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from memtx.data.corpus import CorpusError, Document, list_documents, read_bytes, read_document, split_documents
from memtx.data.vocab import ByteVocab, UndecodableDocument, Vocab

logger = logging.getLogger(__name__)

Position = tuple[int, int]  # (epoch, index within the epoch's draw order)
ReadFn = Callable[[Document], bytes]


class DocumentSource(Protocol):
    vocab: Vocab
    num_docs: int | None  # documents of this shard per epoch, when known without reading them

    def documents(self, epoch: int, index: int) -> Iterator[tuple[int, int, np.ndarray | None]]: ...

    def describe(self) -> dict[str, Any]: ...


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The draw order of one epoch of `n` documents: seeded per epoch, or the given order."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def _safe_read(read_fn: ReadFn, doc: Document) -> bytes | None:
    """`read_fn(doc)`, or None (with a logged warning) if it raises OSError."""
    try:
        return read_fn(doc)
    except OSError as e:
        logger.warning("cannot read document %r: %s", doc.path, e)
        return None


def count_tokens(docs: Sequence[Document], read_fn: ReadFn = read_document) -> int:
    """Total number of bytes of `docs`: the number of tokens predicted when streaming them with
    the byte vocabulary."""
    return sum(len(_safe_read(read_fn, doc) or b"") for doc in docs)


def epochs(read_epoch: Callable[[int, int], Iterator], epoch: int, index: int, repeat: bool,
           what: str) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """`read_epoch(e, start)`'s documents from position (epoch, index) on, then (when repeating)
    every following epoch from its start. A whole epoch with no readable non-empty document is a
    CorpusError rather than an endless search."""
    while True:
        usable = False
        for item in read_epoch(epoch, index):
            usable = usable or (item[2] is not None and len(item[2]) > 0)
            yield item
        if not repeat:
            return
        if index == 0 and not usable:
            raise CorpusError(f"{what}: no readable non-empty document in a whole epoch")
        epoch, index = epoch + 1, 0


class FileSource:
    """Files as documents: this shard's are those at `i % num_shards == shard_index` in `docs`.

    Epoch e visits them in `epoch_order(n, seed, e, shuffle)`. A file that cannot be read, or
    (for SentencePiece) is not UTF-8, is yielded as None with a logged warning."""

    def __init__(self, docs: Sequence[Document], *, vocab: Vocab | None = None, shuffle: bool, repeat: bool,
                 seed: int = 0, shard_index: int = 0, num_shards: int = 1, read_fn: ReadFn = read_bytes,
                 max_tokens: int = 0):
        if num_shards <= 0 or not 0 <= shard_index < num_shards:
            raise ValueError(f"invalid shard {shard_index} of {num_shards} shards")
        self.vocab = vocab or ByteVocab()
        self.shuffle, self.repeat, self.seed = shuffle, repeat, seed
        self.max_tokens = max_tokens  # > 0: each document's first max_tokens tokens only
        self.shard_index, self.num_shards = shard_index, num_shards
        self.docs: list[Document] = list(docs)[shard_index::num_shards]
        if repeat and not self.docs:
            raise CorpusError(f"shard {shard_index} of {num_shards} has no documents")
        self.num_docs = len(self.docs)
        self._read_fn = read_fn
        self._bytes_read = self._ids_read = 0  # for expected_tokens with a vocabulary of many bytes per id
        self._sizes: list[int] | None = None  # the files' sizes, read once by expected_tokens
        digest = hashlib.sha1()
        for doc in self.docs:
            digest.update(doc.relpath.encode("utf-8", "surrogateescape") + b"\0")
        self._digest = digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "num_docs": self.num_docs, "docs_digest": self._digest, "vocab": self.vocab.name,
                "shuffle": bool(self.shuffle), "repeat": bool(self.repeat), "seed": int(self.seed),
                "shard_index": self.shard_index, "num_shards": self.num_shards}

    def _ids(self, doc: Document) -> np.ndarray | None:
        data = _safe_read(self._read_fn, doc)
        if data is None:
            return None
        try:
            ids = self.vocab.encode(data)
            self._bytes_read, self._ids_read = self._bytes_read + len(data), self._ids_read + len(ids)
            return ids[:self.max_tokens] if self.max_tokens else ids
        except UndecodableDocument as e:
            logger.warning("skipping document %r: %s", doc.path, e)
            return None

    def expected_tokens(self) -> int | None:
        """Tokens this shard's documents hold in one epoch (after `max_tokens`), from the files'
        sizes: exact for the byte vocabulary, else estimated with the ids per byte of the
        documents read so far (None before the first). For progress and ETA only."""
        ratio = 1.0 if isinstance(self.vocab, ByteVocab) else (self._ids_read / self._bytes_read if self._bytes_read else None)
        if ratio is None:
            return None
        if self._sizes is None:
            self._sizes = [os.path.getsize(doc.path) if os.path.isfile(doc.path) else 0 for doc in self.docs]
        return int(sum(min(round(size * ratio), self.max_tokens) if self.max_tokens else round(size * ratio)
                       for size in self._sizes))

    def _epoch(self, epoch: int, start: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        order = epoch_order(self.num_docs, self.seed, epoch, self.shuffle)
        for i in range(start, self.num_docs):
            yield epoch, i, self._ids(self.docs[order[i]])

    def documents(self, epoch: int, index: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        return epochs(self._epoch, epoch, index, self.repeat,
                      f"shard {self.shard_index} of {self.num_shards} ({self.num_docs} documents)")

    # Random access, for resuming a stream without reading the documents before its position (a
    # source without these methods is read again from the rows' earliest document).

    def has_position(self, epoch: int, index: int, *, end: bool = False) -> bool:
        """Whether (epoch, index) is a document of the draw order (or, with `end`, the end of an epoch)."""
        return 0 <= index < self.num_docs + end and (epoch == 0 or self.repeat)

    def document(self, epoch: int, index: int) -> np.ndarray | None:
        """The ids of the document at (epoch, index) of the draw order (None: unreadable)."""
        if not self.has_position(epoch, index):
            raise IndexError(f"no document at position {[epoch, index]}")
        return self._ids(self.docs[epoch_order(self.num_docs, self.seed, epoch, self.shuffle)[index]])


SourceFn = Callable[[int, int], "DocumentSource"]  # (shard_index, num_shards) -> this process's source


def file_source_fn(docs: Sequence[Document], vocab: Vocab | None = None) -> SourceFn:
    """An evaluation source over `docs` (every one once, in order) for each process's shard."""
    return lambda shard_index, num_shards: FileSource(docs, vocab=vocab, shuffle=False, repeat=False,
                                                      shard_index=shard_index, num_shards=num_shards)


def check_vocab_fits(vocab: Vocab, model_vocab_size: int) -> None:
    """One-line CorpusError when the model has fewer ids than the data's vocabulary."""
    if vocab.size > model_vocab_size:
        raise CorpusError(f"the vocabulary {vocab.name} has {vocab.size} ids but model.vocab_size is "
                          f"{model_vocab_size}: set --config.model.vocab_size={vocab.size}")


def file_documents(data_cfg, split: str, max_docs: int = 0) -> list[Document]:
    """The documents of `split` of `data.corpus` (a directory, glob, file or "stdlib")."""
    docs = split_documents(list_documents(data_cfg.corpus), split, data_cfg.split_fractions)
    return docs[:max_docs] if max_docs else docs
