"""Vocabularies: the byte vocabulary and SentencePiece models, without TensorFlow.

A vocabulary turns a document's bytes into token ids and names the two ids the stream needs:
`bos_id`, the first input of every document, and `pad_id`, the id of padded positions
(weight 0). The seqio tasks (memtx/data/tasks.py) wrap the same vocabularies for tf.data, so a
document gets the same ids whichever loader reads it.

`data.vocab` in a config is "byte" or the path of a SentencePiece `.model` file (train one
offline with `python -m memtx.data.train_sentencepiece`).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from memtx.data import tokenizer
from memtx.data.corpus import CorpusError


class UndecodableDocument(ValueError):
    """A document's bytes cannot be tokenized by this vocabulary (e.g. not UTF-8 for SentencePiece)."""


class Vocab(Protocol):
    name: str
    size: int  # number of ids; the model's vocab_size must be at least this
    bos_id: int
    pad_id: int

    def encode(self, data: bytes) -> np.ndarray: ...  # int32 ids, no BOS

    def decode(self, ids) -> bytes: ...


class ByteVocab:
    """Ids 0..255 are bytes; then PAD (256), BOS (257) and EOS (258). Never fails to encode."""

    name = "byte"
    size = tokenizer.VOCAB_SIZE
    bos_id = tokenizer.BOS_ID
    pad_id = tokenizer.PAD_ID

    def encode(self, data: bytes) -> np.ndarray:
        return tokenizer.encode(data)

    def decode(self, ids) -> bytes:
        return tokenizer.decode(ids)


class SentencePieceVocab:
    """A SentencePiece model file. BOS is the model's `<s>`, or its `</s>` when it has no `<s>`
    (as T5's models): the end-of-document id then also marks the start of the next one. PAD is
    the model's pad id, or 0 when it has none (padded positions have weight 0 either way)."""

    def __init__(self, model_path: str):
        try:
            import sentencepiece as spm
        except ImportError:  # pragma: no cover - sentencepiece is in requirements.txt
            raise CorpusError("data.vocab names a SentencePiece model, but the sentencepiece package is not "
                              "installed (pip install sentencepiece)") from None
        if not os.path.isfile(model_path):
            raise CorpusError(f"SentencePiece model {model_path!r} does not exist (data.vocab); build one with "
                              "python -m memtx.data.train_sentencepiece")
        self.path = os.path.abspath(model_path)
        self.name = f"spm:{os.path.basename(model_path)}"
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise CorpusError(f"{model_path!r} is not a SentencePiece model: {str(e).splitlines()[0]}") from None
        self.size = int(self._sp.get_piece_size())
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if bos < 0 and eos < 0:
            raise CorpusError(f"SentencePiece model {model_path!r} has neither <s> nor </s>: no id can start a document")
        self.bos_id = int(bos if bos >= 0 else eos)
        self.pad_id = int(pad if pad >= 0 else 0)

    def encode(self, data: bytes) -> np.ndarray:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UndecodableDocument(f"not UTF-8 at byte {e.start}") from None
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> bytes:
        ids = [int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < self.size]
        return self._sp.decode(ids).encode("utf-8")


def load_vocab(spec: str) -> Vocab:
    """`data.vocab`: "byte" or a SentencePiece model path. Raises CorpusError (one line) otherwise."""
    if spec == "byte":
        return ByteVocab()
    if spec.endswith(".model") or os.path.isfile(spec):
        return SentencePieceVocab(spec)
    raise CorpusError(f"data.vocab must be 'byte' or the path of a SentencePiece .model file, got {spec!r}")
