"""The seqio task registry: one task per corpus, each yielding whole documents.

`data.task` names one of TASKS, or `tfds:NAME[:VERSION]` for any prepared tensorflow-datasets
dataset (its text in the feature `data.text_key`). Every task has splits train / validation /
test, one output feature "text" (token ids of a whole document, no EOS) and the preprocessors
rekey + tokenize; `get_task` registers it with seqio under a name derived from its settings.

| task        | documents                          | where the data is (`data.data_dir`)                     |
|-------------|------------------------------------|---------------------------------------------------------|
| pg19        | books (tfds `pg19`)                | a TFDS data dir (local or gs://) holding a prepared pg19 |
| wikitext103 | articles (split at " = Title = ")  | the raw files wiki.{train,valid,test}.raw (or .tokens)   |
| enwik8      | Wikipedia pages (<page>...</page>) | the file enwik8; splits: bytes 90M / 5M / 5M             |
| text8       | 500,000-character pieces           | the file text8; splits: characters 90M / 5M / 5M         |
| files       | one file = one document            | `data.corpus`: a directory or glob; hash-bucket splits   |
| stdlib      | the interpreter's standard library | (none: the embedded default corpus)                      |

This module imports TensorFlow and hides every GPU from it: JAX owns the accelerators.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2: TensorFlow's C++ start-up chatter (CUDA probing, CPU
    features) is written there, where it would bury the one-line errors of the commands."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with _quiet_stderr():
    import tensorflow as tf  # noqa: E402

    tf.config.set_visible_devices([], "GPU")  # before any TF op: TF must not take GPU memory from JAX
    import seqio  # noqa: E402
    import tensorflow_datasets as tfds  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)  # tfds' notes on unprepared folders; ours say what to do

from memtx.data.corpus import CorpusError, list_documents, split_documents, split_of  # noqa: E402
from memtx.data.vocab import ByteVocab, SentencePieceVocab, Vocab  # noqa: E402

SPLITS = ("train", "validation", "test")
TEXT8_DOC_CHARS = 500_000
# enwik8 and text8: the standard split of the first 90M / next 5M / last 5M bytes.
_STANDARD_SPLIT = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000),
                   "test": (95_000_000, 100_000_000)}


# ------------------------------------------------------------------------- vocabularies


class ByteVocabulary(seqio.Vocabulary):
    """memtx's byte vocabulary for seqio: ids 0..255 are the bytes, then PAD, BOS, EOS (256..258),
    the same ids as memtx.data.vocab.ByteVocab."""

    _BYTES = tf.constant([bytes([i]) for i in range(256)])

    @property
    def _base_vocab_size(self) -> int:
        return ByteVocab.size

    @property
    def pad_id(self) -> int:
        return ByteVocab.pad_id

    @property
    def bos_id(self) -> int:
        return ByteVocab.bos_id

    @property
    def eos_id(self) -> int:
        return ByteVocab.bos_id + 1

    @property
    def unk_id(self) -> None:
        return None

    def _encode(self, s):
        data = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        return ByteVocab().encode(data).tolist()

    def _decode(self, ids):
        return ByteVocab().decode(ids).decode("utf-8", errors="replace")

    def _encode_tf(self, s):
        return tf.cast(tf.io.decode_raw(s, tf.uint8), tf.int32)

    def _decode_tf(self, ids):
        ids = tf.boolean_mask(ids, (ids >= 0) & (ids < 256))
        return tf.strings.reduce_join(tf.gather(self._BYTES, ids), axis=-1)

    def __eq__(self, other):
        return isinstance(other, ByteVocabulary)


def seqio_vocabulary(vocab: Vocab) -> seqio.Vocabulary:
    """The seqio vocabulary giving the same ids as `vocab`."""
    if isinstance(vocab, SentencePieceVocab):
        return seqio.SentencePieceVocabulary(vocab.path)
    if isinstance(vocab, ByteVocab):
        return ByteVocabulary()
    raise TypeError(f"no seqio vocabulary for {vocab!r}")


# ---------------------------------------------------------------------- local sources


def _function_source(generate: Callable[[str], Iterator[bytes]]) -> seqio.DataSource:
    """A seqio source over a Python generator of documents per split ({"text": bytes})."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(lambda: ({"text": doc} for doc in generate(split)),
                                              output_signature={"text": tf.TensorSpec((), tf.string)})

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def _find(data_dir: str, names: list[str], task: str, hint: str) -> str:
    for name in names:
        path = os.path.join(data_dir, name) if data_dir else name
        if os.path.isfile(path):
            return path
        if data_dir and os.path.isfile(data_dir) and os.path.basename(data_dir) == name:
            return data_dir
    raise CorpusError(f"task {task}: no {' or '.join(names)} in data.data_dir={data_dir or '(unset)'!r}; {hint}")


_WIKITEXT_HEADING = re.compile(rb"^ = [^=].* = $")


def wikitext_articles(path: str) -> Iterator[bytes]:
    """The articles of a WikiText file: each starts at a top-level heading line ' = Title = '."""
    article: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            if _WIKITEXT_HEADING.match(line.rstrip(b"\n")) and any(l.strip() for l in article):
                yield b"".join(article)
                article = []
            article.append(line)
    if any(l.strip() for l in article):
        yield b"".join(article)


def _wikitext103(data_cfg) -> seqio.DataSource:
    hint = ("unpack wikitext-103-raw-v1.zip there (wiki.train.raw, wiki.valid.raw, wiki.test.raw); "
            "see the README's 'Data at scale'")
    names = {"train": "train", "validation": "valid", "test": "test"}
    paths = {s: _find(data_cfg.data_dir, [f"wiki.{n}.raw", f"wiki.{n}.tokens"], "wikitext103", hint)
             for s, n in names.items()}
    return _function_source(lambda split: wikitext_articles(paths[split]))


def _read_range(path: str, start: int, end: int, task: str) -> bytes:
    size = os.path.getsize(path)
    if size < _STANDARD_SPLIT["test"][1]:
        raise CorpusError(f"task {task}: {path} has {size:,} bytes; the standard split needs 100,000,000")
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def enwik8_pages(data: bytes) -> Iterator[bytes]:
    """Wikipedia pages of a piece of enwik8: each from a '<page>' line to the next one (the
    piece's start and end may cut a page; text before the first '<page>' is a document too)."""
    starts = [m.start() for m in re.finditer(rb"^[ \t]*<page>", data, re.MULTILINE)]
    bounds = ([0] if not starts or starts[0] > 0 else []) + starts + [len(data)]
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            yield data[a:b]


def _enwik8(data_cfg) -> seqio.DataSource:
    path = _find(data_cfg.data_dir, ["enwik8"], "enwik8", "unzip enwik8.zip there (100,000,000 bytes)")
    return _function_source(lambda split: enwik8_pages(_read_range(path, *_STANDARD_SPLIT[split], "enwik8")))


def _text8(data_cfg) -> seqio.DataSource:
    path = _find(data_cfg.data_dir, ["text8"], "text8", "unzip text8.zip there (100,000,000 characters)")

    def pieces(split: str) -> Iterator[bytes]:
        data = _read_range(path, *_STANDARD_SPLIT[split], "text8")
        for i in range(0, len(data), TEXT8_DOC_CHARS):
            yield data[i:i + TEXT8_DOC_CHARS]

    return _function_source(pieces)


def _files(data_cfg, corpus: str | None = None) -> seqio.DataSource:
    """One file = one document, split by hash buckets exactly like the TensorFlow-free loader."""
    docs = list_documents(corpus or data_cfg.corpus)
    paths = {s: [d.path for d in docs if split_of(d.relpath, data_cfg.split_fractions) == s] for s in SPLITS}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        split_documents(docs, split, data_cfg.split_fractions)  # a one-line error for an empty split
        return tf.data.Dataset.from_tensor_slices(paths[split]).map(lambda p: {"text": tf.io.read_file(p)})

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS, num_input_examples={s: len(p) for s, p in paths.items()})


def _check_tfds_prepared(name: str, data_dir: str) -> str:
    """`name` with its version; one-line CorpusError unless tfds `name` is prepared under
    `data_dir` (nothing is downloaded)."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    base = name.split(":")[0].split("/")[0]
    todo = (f"on a machine with internet run `tfds build {base} --data_dir=DIR` (or copy "
            f"gs://tfds-data/datasets/{base} into DIR), then pass --config.data.data_dir=DIR "
            "(a local path or gs://BUCKET/tensorflow_datasets; TFDS_DATA_DIR works too)")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
        prepared = builder.is_prepared()
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        raise CorpusError(f"tfds dataset {name!r} is not available in {where} ({str(e).splitlines()[0][:120]}): "
                          f"{todo}") from None
    if not prepared:
        raise CorpusError(f"tfds dataset {name!r} is not prepared in {where}: {todo}")
    return name if ":" in name else f"{name}:{builder.info.version}"


def _tfds(name: str, data_cfg) -> seqio.DataSource:
    return seqio.TfdsDataSource(tfds_name=_check_tfds_prepared(name, data_cfg.data_dir), tfds_data_dir=data_cfg.data_dir or None,
                                splits={"train": "train", "validation": "validation", "test": "test"})


@dataclass(frozen=True)
class TaskSpec:
    about: str
    make_source: Callable[..., seqio.DataSource]  # (data config) -> source
    text_key: str = "text"


TASKS: dict[str, TaskSpec] = {
    "pg19": TaskSpec("PG-19 books (tfds pg19)", lambda c: _tfds("pg19", c), text_key="book_text"),
    "wikitext103": TaskSpec("WikiText-103 articles (local raw files)", _wikitext103),
    "enwik8": TaskSpec("enwik8 Wikipedia pages (local file, 90M/5M/5M bytes)", _enwik8),
    "text8": TaskSpec(f"text8 in {TEXT8_DOC_CHARS:,}-character documents (local file, 90M/5M/5M)", _text8),
    "files": TaskSpec("local files, one per document (data.corpus: a directory or glob)", _files),
    "stdlib": TaskSpec("the interpreter's standard library (the default corpus)", lambda c: _files(c, "stdlib")),
}


def task_spec(name: str, data_cfg) -> TaskSpec:
    if name.startswith("tfds:"):
        tfds_name = name[len("tfds:"):]
        return TaskSpec(f"tfds {tfds_name}", lambda c: _tfds(tfds_name, c), text_key=data_cfg.text_key)
    if name not in TASKS:
        raise CorpusError(f"unknown data.task {name!r}; expected one of {', '.join(TASKS)} or tfds:NAME[:VERSION]")
    return TASKS[name]


def get_task(data_cfg, vocab: Vocab) -> seqio.Task:
    """The seqio task `data_cfg` names, registered on first use. Raises CorpusError (one line)
    when its data is missing or not prepared."""
    spec = task_spec(data_cfg.task, data_cfg)
    settings = repr((data_cfg.task, data_cfg.data_dir, data_cfg.corpus, spec.text_key,
                     tuple(data_cfg.split_fractions), vocab.name, getattr(vocab, "path", "")))
    name = f"memtx_{re.sub(r'[^A-Za-z0-9_]', '_', data_cfg.task)}_{hashlib.sha1(settings.encode()).hexdigest()[:10]}"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=spec.make_source(data_cfg),
            preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"text": spec.text_key}),
                           seqio.preprocessors.tokenize],
            output_features={"text": seqio.Feature(seqio_vocabulary(vocab), add_eos=False, dtype=tf.int32)})
    return seqio.get_mixture_or_task(name)
