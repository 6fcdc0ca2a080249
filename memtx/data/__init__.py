"""Data pipeline: byte tokenizer, document corpora and splits, batched document streams."""

from memtx.data.corpus import (
    CorpusError,
    Document,
    list_documents,
    read_document,
    split_documents,
    split_of,
)
from memtx.data.stream import DocumentStream, count_tokens
from memtx.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "CorpusError",
    "Document",
    "DocumentStream",
    "count_tokens",
    "decode",
    "encode",
    "list_documents",
    "read_document",
    "split_documents",
    "split_of",
]
