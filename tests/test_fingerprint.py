"""Corpus fingerprints: documents, bytes and a hash of the sorted paths and sizes."""

from memtx.config import DataConfig
from memtx.data.fingerprint import corpus_fingerprint, describe
from tests.helpers import make_corpus


def test_fingerprint_counts_the_corpus_and_changes_with_it(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", num_docs=3)
    fp = corpus_fingerprint(DataConfig(corpus=str(corpus)))
    assert fp["documents"] == 3 and fp["bytes"] == sum(p.stat().st_size for p in corpus.iterdir())
    assert len(fp["sha256"]) == 12 and fp["sha256"] in describe(fp)
    # the same files elsewhere: the same fingerprint; one byte more or a renamed file: another
    copy = make_corpus(tmp_path / "copy", num_docs=3)
    assert corpus_fingerprint(DataConfig(corpus=str(copy))) == {**fp, "corpus": str(copy)}
    with open(copy / "doc0.py", "ab") as f:
        f.write(b"\n")
    assert corpus_fingerprint(DataConfig(corpus=str(copy)))["sha256"] != fp["sha256"]
    (corpus / "doc1.py").rename(corpus / "doc9.py")
    assert corpus_fingerprint(DataConfig(corpus=str(corpus)))["sha256"] != fp["sha256"]
    task = corpus_fingerprint(DataConfig(task="pg19", data_dir="/data"))
    assert task["task"] == "pg19" and task["documents"] is None and "pg19" in describe(task)
