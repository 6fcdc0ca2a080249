"""The document source a data config names: a seqio task (`data.task`, memtx/data/tasks.py;
TensorFlow is imported only then) or the files of `data.corpus` (memtx/data/sources.py). Apart
from both so that neither imports the other."""

from __future__ import annotations

from memtx.data.sources import DocumentSource, FileSource, file_documents
from memtx.data.vocab import load_vocab


def open_source(data_cfg, split: str, *, train: bool, shard_index: int = 0, num_shards: int = 1,
                max_docs: int = 0) -> DocumentSource:
    """The source a config names: `data.task` (a seqio task, see memtx/data/tasks.py) or, when it
    is empty, the files of `data.corpus`. Training sources shuffle with `data.seed` and repeat;
    evaluation sources read every document once, in order. Raises CorpusError (one line)."""
    vocab = load_vocab(data_cfg.vocab)
    if data_cfg.task:
        from memtx.data.seqio_source import SeqioSource  # TensorFlow is imported only here

        return SeqioSource.from_config(data_cfg, split, vocab=vocab, train=train, shard_index=shard_index,
                                       num_shards=num_shards, max_docs=max_docs)
    return FileSource(file_documents(data_cfg, split, max_docs), vocab=vocab, shuffle=train, repeat=train,
                      seed=data_cfg.seed, shard_index=shard_index, num_shards=num_shards,
                      max_tokens=0 if train else data_cfg.eval_doc_tokens)
