"""Data at scale, offline: a tfds builder over local files, read through a seqio task into the
long-document stream; vocabularies; hosts reading disjoint shares; exact resume; bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import importlib.util

import numpy as np
import pytest

from memtx.config import DataConfig
from memtx.data import ByteVocab, CorpusError, DocumentStream, file_documents, load_vocab, open_source
from memtx.data.train_sentencepiece import train as train_spm
from tests.helpers import make_corpus, tiny_config

# TensorFlow is imported when these tests run, not when they are collected, and they run last
# (conftest.py): the rest of the suite never has TensorFlow in its process.
pytestmark = [
    pytest.mark.tensorflow,
    pytest.mark.skipif(importlib.util.find_spec("seqio") is None or importlib.util.find_spec("tensorflow_datasets")
                       is None, reason="seqio/tensorflow-datasets are not installed (requirements-data.txt)"),
]


@pytest.fixture(scope="module")
def tf():
    from memtx.data.tasks import tf

    return tf


@pytest.fixture(scope="module")
def tasks():
    from memtx.data import tasks

    return tasks


REPO = Path(__file__).resolve().parents[1]
N = 16
SPLIT_SIZES = {"train": 23, "validation": 5, "test": 4}


def _document(split: str, i: int) -> bytes:
    """A distinct, multi-segment document: a slice of a stdlib file, prefixed with its name."""
    rng = np.random.default_rng([len(split), i])
    head = f"# {split} document {i}\n".encode()
    return head + (b"word " * int(rng.integers(1, 40))) + b"\n" + bytes(rng.integers(97, 123, int(rng.integers(5, 300)),
                                                                              dtype=np.uint8))


def make_builder_class():
    """A tfds builder of local text files (the test writes them to SOURCE_DIR), one example each."""
    from memtx.data.tasks import tfds

    class MemtxTestDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        SOURCE_DIR = ""

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(Path(self.SOURCE_DIR) / split) for split in SPLIT_SIZES}

        def _generate_examples(self, directory: Path):
            for path in sorted(directory.iterdir()):
                yield path.name, {"text": path.read_bytes(), "name": path.name}

    return MemtxTestDocs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, list[bytes]]]:
    """A prepared tfds data dir of MemtxTestDocs, and the documents of each split."""
    root = tmp_path_factory.mktemp("tfds")
    docs = {}
    for split, n in SPLIT_SIZES.items():
        (root / "files" / split).mkdir(parents=True)
        docs[split] = [_document(split, i) for i in range(n)]
        for i, data in enumerate(docs[split]):
            (root / "files" / split / f"doc{i:03d}.txt").write_bytes(data)
    builder_class = make_builder_class()
    builder_class.SOURCE_DIR = str(root / "files")
    builder_class(data_dir=str(root / "data")).download_and_prepare()
    return root / "data", docs


def data_cfg(data_dir: Path | str, **kw) -> DataConfig:
    return DataConfig(**{"task": "tfds:memtx_test_docs", "data_dir": str(data_dir), "seq_len": N, **kw})


def stream_of(cfg: DataConfig, split: str, batch_size: int, *, train: bool, shard: int = 0, shards: int = 1,
              state=None) -> DocumentStream:
    source = open_source(cfg, split, train=train, shard_index=shard, num_shards=shards)
    return DocumentStream(source, batch_size, N, state=state)


def documents_of(stream: DocumentStream, max_steps: int = 10_000) -> list[np.ndarray]:
    """Each document streamed (its token ids, BOS dropped), in the order its first segment appeared."""
    current: dict[int, list] = {}
    done: list[tuple[int, np.ndarray]] = []
    for step in range(max_steps):
        batch = stream.next_batch()
        if batch is None:
            break
        for row in range(batch["inputs"].shape[0]):
            m = int(batch["weights"][row].sum())
            if batch["reset"][row] or m == 0:
                if row in current:
                    done.append((current[row][0], np.concatenate(current.pop(row)[1])))
            if m == 0:
                continue
            if batch["reset"][row]:
                assert batch["inputs"][row, 0] == stream.source.vocab.bos_id
                current[row] = [(step, row), []]
            current[row][1].append(batch["targets"][row, :m])
    done += [(v[0], np.concatenate(v[1])) for v in current.values()]
    return [ids for _, ids in sorted(done, key=lambda x: x[0])]


def as_bytes(docs: list[np.ndarray]) -> list[bytes]:
    return [ByteVocab().decode(d) for d in docs]


# ------------------------------------------------------------------------ the seqio task


def test_eval_reads_every_document_once_in_order(prepared):
    data_dir, docs = prepared
    for split in SPLIT_SIZES:
        got = as_bytes(documents_of(stream_of(data_cfg(data_dir), split, 3, train=False)))
        # tfds keeps its (hashed-key) record order: a fixed order over all documents, each once.
        assert sorted(got) == sorted(docs[split]) and len(got) == len(docs[split])
        again = as_bytes(documents_of(stream_of(data_cfg(data_dir), split, 5, train=False)))
        assert again == got


@pytest.mark.slow
def test_python_tokenization_equals_the_tasks_own_pipeline(prepared, tmp_path):
    data_dir, _ = prepared
    spm_path = train_spm("stdlib", str(tmp_path / "spm"), vocab_size=600, max_mb=2)
    for vocab in ("byte", spm_path):
        cfg = data_cfg(data_dir, vocab=vocab)
        source = open_source(cfg, "train", train=False)
        ours = [ids for _, _, ids in source.documents(0, 0)]
        theirs = [ex["text"] for ex in source.task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()]
        assert len(ours) == len(theirs) == SPLIT_SIZES["train"]
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_tokenization_round_trips(tmp_path, tf, tasks):
    texts = ["plain ascii\n", "héllo wörld ☃ \t tabs\n\n  spaces", "def f(x):\n    return x ** 2  # ✓\n", ""]
    spm_path = train_spm("stdlib", str(tmp_path / "spm"), vocab_size=600, max_mb=2)
    for spec in ("byte", spm_path):
        vocab = load_vocab(spec)
        seqio_vocab = tasks.seqio_vocabulary(vocab)
        assert seqio_vocab.vocab_size == vocab.size
        for text in texts:
            ids = vocab.encode(text.encode())
            assert ids.dtype == np.int32 and (ids < vocab.size).all()
            assert vocab.decode(ids) == text.encode()
            assert list(seqio_vocab.encode(text)) == ids.tolist()
            assert seqio_vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids.tolist()
            assert seqio_vocab.decode(ids.tolist()) == text
    byte_ids = load_vocab("byte").encode(b"\xff\x00a")
    assert byte_ids.tolist() == [255, 0, 97]
    assert tasks.ByteVocabulary().decode_tf(tf.constant([104, 105, 256, 257])).numpy() == b"hi"
    spm = load_vocab(spm_path)
    assert (spm.bos_id, spm.pad_id, spm.size) == (3, 0, 600)


def test_two_hosts_read_disjoint_documents_covering_the_corpus(prepared):
    data_dir, docs = prepared
    for train in (False, True):
        seen = []
        for host in range(2):
            stream = stream_of(data_cfg(data_dir), "train", 2, train=train, shard=host, shards=2)
            got = as_bytes(documents_of(stream, max_steps=400))
            if train:  # an endless stream, cut off mid-document at the end: keep the finished ones
                assert all(any(d.startswith(g) for d in docs["train"]) for g in got)
                got = [g for g in got if g in docs["train"]]
            seen.append(set(got))
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(docs["train"])


def test_training_order_is_seeded_per_epoch(prepared):
    data_dir, _ = prepared

    def first_epoch_order(seed: int, epoch: int = 0) -> list[bytes]:
        source = open_source(data_cfg(data_dir, seed=seed), "train", train=True)
        out = []
        for e, _, ids in source.documents(epoch, 0):
            if e != epoch:
                break
            out.append(ByteVocab().decode(ids))
        return out

    a, b = first_epoch_order(1), first_epoch_order(1)
    assert a == b and len(a) == SPLIT_SIZES["train"]
    assert first_epoch_order(2) != a and first_epoch_order(1, epoch=1) != a
    assert sorted(first_epoch_order(1, epoch=1)) == sorted(a)


@pytest.mark.parametrize("steps_before", [3, 17, 150])
def test_resume_is_exact_mid_document_across_epochs(prepared, steps_before):
    data_dir, _ = prepared
    cfg = data_cfg(data_dir, seed=3)
    original = stream_of(cfg, "train", 3, train=True)
    for _ in range(steps_before):
        original.next_batch()
    state = json.loads(json.dumps(original.state()))
    assert any(p > 0 for p in state["row_pos"]), "the state should be taken mid-document"
    expected = [original.next_batch() for _ in range(250)]  # crosses into later epochs
    assert original.epoch >= 1
    restored = stream_of(cfg, "train", 3, train=True, state=state)
    for a, b in zip(expected, (restored.next_batch() for _ in range(250))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert restored.state() == original.state()
    with pytest.raises(ValueError, match="seed"):
        stream_of(data_cfg(data_dir, seed=4), "train", 3, train=True, state=state)


def test_files_task_streams_like_the_tensorflow_free_loader(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus", num_docs=6))
    cfg = DataConfig(corpus=corpus, split_fractions=(1, 0, 0), seq_len=N)
    native = DocumentStream(open_source(cfg, "train", train=False), 4, N)
    seqio_cfg = DataConfig(corpus=corpus, split_fractions=(1, 0, 0), seq_len=N, task="files")
    via_seqio = DocumentStream(open_source(seqio_cfg, "train", train=False), 4, N)
    assert type(via_seqio.source).__name__ == "SeqioSource"
    count = 0
    for a, b in zip(native, via_seqio):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        count += 1
    assert count > 10 and native.next_batch() is None and via_seqio.next_batch() is None
    assert len(file_documents(cfg, "train")) == 6


@pytest.mark.slow
def test_training_on_a_seqio_task_resumes_exactly(prepared, tmp_path):
    """The stream's position goes into the orbax checkpoint beside the model: a run stopped
    mid-document and resumed has the per-step losses of a run straight through."""
    from memtx.workdir_files import read_metrics
    from tests.test_resume import stop_resume_and_compare

    data_dir, _ = prepared

    def cfg(**train):
        c = tiny_config(**{"steps": 10, "checkpoint_every": 5, **train})
        c.data.task, c.data.data_dir, c.data.seed = "tfds:memtx_test_docs", str(data_dir), 1
        return c

    losses = stop_resume_and_compare(cfg, tmp_path, stop=5)
    assert len({round(v, 6) for v in losses.values()}) == len(losses)
    assert all(m["skipped_documents"] == 0 for m in read_metrics(tmp_path / "resumed"))


# ------------------------------------------------------------------------------ bad data


@pytest.mark.slow
def test_undecodable_documents_are_skipped_and_counted(tmp_path):
    spm_path = train_spm("stdlib", str(tmp_path / "spm"), vocab_size=600, max_mb=2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"ok{i}.txt").write_text(f"document {i}\n" * (i + 3))
    (corpus / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    for task in ("", "files"):
        cfg = DataConfig(corpus=str(corpus), split_fractions=(1, 0, 0), seq_len=N, vocab=spm_path, task=task)
        stream = DocumentStream(open_source(cfg, "train", train=False), 2, N)
        got = documents_of(stream)
        assert len(got) == 5 and stream.skipped == 1, task
        assert stream.state()["skipped"] == 1


def test_corrupt_record_ends_the_epoch_without_a_crash(prepared, tmp_path):
    import shutil

    data_dir, docs = prepared
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    record_file = next((copy / "memtx_test_docs" / "1.0.0").glob("*-train.tfrecord*"))
    raw = record_file.read_bytes()
    cut = raw.find(b"document", len(raw) // 2)
    record_file.write_bytes(raw[:cut] + b"X" + raw[cut + 1:])  # a payload byte: the record's CRC fails
    for train in (False, True):
        stream = stream_of(data_cfg(copy), "train", 2, train=train)
        got = as_bytes(documents_of(stream, max_steps=300))
        assert stream.skipped >= 1
        assert got and set(got) < set(docs["train"])


def test_unprepared_tfds_data_is_one_line_naming_the_fix(tmp_path):
    for task in ("pg19", "tfds:memtx_test_docs"):
        with pytest.raises(CorpusError) as info:
            open_source(DataConfig(task=task, data_dir=str(tmp_path / "empty")), "train", train=True)
        message = str(info.value)
        assert "\n" not in message and "tfds build" in message and "data_dir" in message, message


def test_local_task_files_missing_or_unknown(tmp_path):
    for task, name in (("wikitext103", "wiki.train.raw"), ("enwik8", "enwik8"), ("text8", "text8")):
        with pytest.raises(CorpusError, match=name):
            open_source(DataConfig(task=task, data_dir=str(tmp_path)), "train", train=True)
    with pytest.raises(CorpusError, match="unknown data.task"):
        open_source(DataConfig(task="c4"), "train", train=True)


@pytest.mark.slow
def test_cli_reports_unprepared_data_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "memtx.train", "--config", "configs/txl.py:cpu", "--workdir", str(tmp_path / "run"),
         "--config.data.task=pg19", f"--config.data.data_dir={tmp_path / 'nothing'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: tfds dataset 'pg19'"), proc.stderr


# ----------------------------------------------------------------------- local formats


def test_wikitext_articles_and_enwik8_pages(tmp_path, tasks):
    wiki = tmp_path / "wiki.train.raw"
    wiki.write_bytes(b" \n = Alpha = \n \n Text a .\n = = Section = = \n More a .\n = Beta = \n Text b .\n")
    articles = list(tasks.wikitext_articles(str(wiki)))
    assert articles == [b" \n = Alpha = \n \n Text a .\n = = Section = = \n More a .\n", b" = Beta = \n Text b .\n"]
    xml = b"<mediawiki>\n  <page>\n    <title>A</title>\n  </page>\n  <page>\n    <title>B</title>\n  </page>\n"
    pages = list(tasks.enwik8_pages(xml))
    assert pages[0] == b"<mediawiki>\n" and len(pages) == 3 and b"".join(pages) == xml
    assert pages[2].lstrip().startswith(b"<page>") and b"<title>B" in pages[2]


def test_tensorflow_stays_out_of_the_model_train_step_and_benchmarks():
    code = ("import sys; import memtx.train, memtx.evaluate, memtx.model, memtx.step, memtx.data, "
            "benchmarks.step_time, benchmarks.loader_throughput; "
            "print(sorted(m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
