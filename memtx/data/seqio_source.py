"""A seqio task as a document source for memtx's long-document stream.

Each process reads its own shard of the task's documents (seqio.ShardInfo: whole files when
the source has at least as many as there are processes, else every num_shards-th document).
Training reads each epoch in a new seeded order (the source's file shuffle, then a shuffle
buffer of `data.shuffle_buffer` documents, both seeded with (data.seed, epoch)); evaluation
reads every document once, in the source's order. The buffer holds raw documents: 256 PG-19
books are about 100 MB.

Documents are read from `task.source` and tokenized here, in Python, with the task's own
vocabulary (`task.output_features["text"].vocabulary`; the same ids as task.get_dataset, which
a test checks). Tokenizing here, not in tf.data, is what makes positions exact: a document is
position i of its epoch whether it reads, fails to decode or is skipped on resume, so resuming
replays the epoch up to the saved position without tokenizing it. A record that fails to decode
or tokenize is yielded as None (the stream skips and counts it). A corrupt TFRecord stops
TensorFlow's reader for good, so it ends the epoch's reading (logged, counted once); the
documents already in the shuffle buffer are still streamed.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import numpy as np

from memtx.data.corpus import CorpusError
from memtx.data.sources import epochs
from memtx.data.tasks import ByteVocabulary, get_task, seqio, task_spec, tf
from memtx.data.vocab import Vocab

logger = logging.getLogger(__name__)

_MAX_CONSECUTIVE_ERRORS = 1000
_BROKEN_READER = (tf.errors.DataLossError, tf.errors.FailedPreconditionError)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))


class SeqioSource:
    def __init__(self, task: seqio.Task, split: str, *, vocab: Vocab, text_key: str = "text", shuffle: bool,
                 repeat: bool, seed: int = 0, shard_index: int = 0, num_shards: int = 1,
                 shuffle_buffer: int = 1024, max_docs: int = 0):
        if num_shards <= 0 or not 0 <= shard_index < num_shards:
            raise ValueError(f"invalid shard {shard_index} of {num_shards} shards")
        if split not in task.source.splits:
            raise CorpusError(f"task {task.name} has no split {split!r} (it has {', '.join(task.source.splits)})")
        self.task, self.split, self.vocab, self.text_key = task, split, vocab, text_key
        self.shuffle, self.repeat, self.seed = shuffle, repeat, seed
        self.shard_index, self.num_shards = shard_index, num_shards
        self.shuffle_buffer, self.max_docs = shuffle_buffer, max_docs
        self._tokenizer = task.output_features["text"].vocabulary
        n = task.source.num_input_examples(split)
        self.num_docs = None if n is None else math.ceil(n / num_shards)  # approximate when sharded by files
        if max_docs:
            self.num_docs = min(self.num_docs or max_docs, math.ceil(max_docs / num_shards))

    @classmethod
    def from_config(cls, data_cfg, split: str, *, vocab: Vocab, train: bool, shard_index: int = 0,
                    num_shards: int = 1, max_docs: int = 0) -> "SeqioSource":
        return cls(get_task(data_cfg, vocab), split, vocab=vocab, text_key=task_spec(data_cfg.task, data_cfg).text_key,
                   shuffle=train, repeat=train, seed=data_cfg.seed, shard_index=shard_index, num_shards=num_shards,
                   shuffle_buffer=data_cfg.shuffle_buffer, max_docs=max_docs)

    def describe(self) -> dict[str, Any]:
        return {"kind": "seqio", "task": self.task.name, "split": self.split, "vocab": self.vocab.name,
                "shuffle": bool(self.shuffle), "repeat": bool(self.repeat), "seed": int(self.seed),
                "shuffle_buffer": self.shuffle_buffer if self.shuffle else 0, "max_docs": self.max_docs,
                "shard_index": self.shard_index, "num_shards": self.num_shards}

    def raw_dataset(self, epoch: int) -> tf.data.Dataset:
        """This shard's untokenized documents of `epoch`, in the source's (seeded) file order."""
        source, split = self.task.source, self.split
        seed = _epoch_seed(self.seed, epoch) if self.shuffle else None
        shard = seqio.ShardInfo(index=self.shard_index, num_shards=self.num_shards)
        if self.num_shards > 1 and (source.supports_arbitrary_sharding
                                    or len(source.list_shards(split)) >= self.num_shards):
            ds = source.get_dataset(split=split, shuffle=self.shuffle, seed=seed, shard_info=shard)
        else:
            ds = source.get_dataset(split=split, shuffle=self.shuffle, seed=seed)
            if self.num_shards > 1:
                ds = ds.shard(self.num_shards, self.shard_index)
        if self.max_docs:
            ds = ds.take(math.ceil(self.max_docs / self.num_shards))
        key = self.text_key
        return ds.map(lambda ex: ex[key]).prefetch(tf.data.AUTOTUNE)

    def _records(self, epoch: int) -> Iterator[bytes | None]:
        """The raw documents of `epoch`; None for a record that failed to read. A corrupt
        TFRecord leaves TensorFlow's reader broken for good: it gives one None and ends the epoch."""
        it = iter(self.raw_dataset(epoch))
        errors = 0
        while True:
            try:
                text = next(it)
            except (StopIteration, tf.errors.OutOfRangeError):
                return
            except _BROKEN_READER as e:
                logger.warning("%s: corrupt data ends epoch %d early: %s", self.task.name, epoch,
                               str(e).splitlines()[0][:300])
                yield None
                return
            except tf.errors.OpError as e:  # this record only (e.g. it does not parse)
                errors += 1
                if errors >= _MAX_CONSECUTIVE_ERRORS:
                    raise CorpusError(f"{self.task.name}: {errors} records in a row failed to read; the last: "
                                      f"{str(e).splitlines()[0][:300]}") from None
                logger.warning("%s: skipping a record that failed to read: %s", self.task.name,
                               str(e).splitlines()[0][:300])
                yield None
                continue
            errors = 0
            yield text.numpy()

    def _shuffled(self, records: Iterator, epoch: int) -> Iterator:
        """A seeded shuffle buffer of `shuffle_buffer` documents (in Python, so that what it holds
        when a corrupt file ends the epoch is still read)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        buffer: list = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            j = int(rng.integers(self.shuffle_buffer))
            yield buffer[j]
            buffer[j] = record
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def _tokenize(self, text: bytes) -> np.ndarray | None:
        try:
            ids = self._tokenizer.encode(text if isinstance(self._tokenizer, ByteVocabulary) else text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RuntimeError) as e:
            logger.warning("%s: skipping an undecodable document (%s)", self.task.name, str(e).splitlines()[0][:200])
            return None
        return np.asarray(ids, dtype=np.int32)

    def _epoch(self, epoch: int, start: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        records = self._records(epoch)
        if self.shuffle and self.shuffle_buffer > 1:
            records = self._shuffled(records, epoch)
        for index, text in enumerate(records):
            if index >= start:  # positions before `start` are read, not tokenized (resuming)
                yield epoch, index, None if text is None else self._tokenize(text)

    def documents(self, epoch: int, index: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        return epochs(self._epoch, epoch, index, self.repeat,
                      f"{self.task.name} split {self.split}, shard {self.shard_index} of {self.num_shards}")
