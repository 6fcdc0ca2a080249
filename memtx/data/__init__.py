"""Data pipeline: vocabularies, document corpora and splits, document sources, batched streams.

Nothing here imports TensorFlow; the seqio tasks (tasks.py, seqio_source.py) do, on first use.
"""

from memtx.data.corpus import (
    CorpusError,
    Document,
    list_documents,
    read_document,
    split_documents,
    split_of,
)
from memtx.data.sources import (
    DocumentSource,
    FileSource,
    check_vocab_fits,
    count_tokens,
    file_documents,
    file_source_fn,
)
from memtx.data.config_source import open_source
from memtx.data.stream import DocumentStream
from memtx.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode
from memtx.data.vocab import ByteVocab, SentencePieceVocab, Vocab, load_vocab

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "ByteVocab",
    "CorpusError",
    "Document",
    "DocumentSource",
    "DocumentStream",
    "FileSource",
    "SentencePieceVocab",
    "Vocab",
    "check_vocab_fits",
    "count_tokens",
    "decode",
    "encode",
    "file_documents",
    "file_source_fn",
    "list_documents",
    "load_vocab",
    "open_source",
    "read_document",
    "split_documents",
    "split_of",
]
