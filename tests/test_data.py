"""Tests of the data pipeline: tokenizer, corpus listing and splits, document streams."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from memtx.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    CorpusError,
    Document,
    DocumentStream,
    FileSource,
    count_tokens,
    decode,
    encode,
    list_documents,
    read_document,
    split_documents,
    split_of,
)

N = 8  # segment length used by most stream tests


def file_stream(docs, batch_size, seq_len, *, shuffle, repeat, seed=0, shard_index=0, num_shards=1,
                read_fn=None, state=None, loss_mask=None) -> DocumentStream:
    source = FileSource(docs, shuffle=shuffle, repeat=repeat, seed=seed, shard_index=shard_index,
                        num_shards=num_shards, **({"read_fn": read_fn} if read_fn else {}))
    return DocumentStream(source, batch_size, seq_len, state=state, loss_mask=loss_mask)

# Document lengths around multiples of N, to exercise every boundary case.
LENGTHS = [1, 2, N - 1, N, N + 1, 2 * N - 1, 2 * N, 2 * N + 1, 5 * N + 3, 37]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small corpus: nested dirs, a non-UTF-8 file, an empty file, hidden and cache files."""
    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    for i, length in enumerate(LENGTHS):
        # A distinct first byte makes every document's content unique.
        data = bytes([i]) + rng.integers(0, 256, length - 1, dtype=np.uint8).tobytes()
        path = root / f"d{i % 3}" / ("deep" if i % 2 else "") / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00abc")
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_bytes(b"hidden")
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_bytes(b"hidden")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"cache")
    return root


def contents(docs: list[Document]) -> dict[bytes, str]:
    """Map each non-empty document's bytes to its relpath (contents are unique)."""
    out = {read_document(d): d.relpath for d in docs}
    out.pop(b"", None)
    return out


def run_stream(stream: DocumentStream, max_steps: int) -> list[dict[str, np.ndarray]]:
    """Up to `max_steps` batches of `stream` (fewer if it ends)."""
    batches = []
    for _ in range(max_steps):
        batch = stream.next_batch()
        if batch is None:
            break
        batches.append(batch)
    return batches


def check_and_collect(batches: list[dict[str, np.ndarray]]) -> list[tuple[int, int, bytes]]:
    """Check the per-segment invariants and reassemble each row's documents.

    Returns (start step, row, bytes) for every document emitted, in order of (step, row).
    """
    B, n = batches[0]["inputs"].shape
    docs: list[tuple[int, int, bytes]] = []
    current: list[list | None] = [None] * B  # per row: [start step, chunks, last target]
    for step, batch in enumerate(batches):
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32 and batch["reset"].dtype == bool
        assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (B, n)
        assert batch["reset"].shape == (B,)
        for row in range(B):
            inputs, targets = batch["inputs"][row], batch["targets"][row]
            weights, reset = batch["weights"][row], bool(batch["reset"][row])
            m = int(weights.sum())
            # Valid positions are a prefix; padding is PAD with weight 0.
            assert set(np.unique(weights)) <= {0.0, 1.0}
            assert np.all(weights[:m] == 1.0) and np.all(weights[m:] == 0.0)
            assert np.all(inputs[m:] == PAD_ID) and np.all(targets[m:] == PAD_ID)
            assert np.all(targets[:m] < 256) and np.all(inputs[1:m] < 256)
            assert np.array_equal(batch["loss_weights"][row], weights)  # no loss mask: every valid target
            if m == 0:
                assert not reset, "an idle row must not be reset"
                assert current[row] is None, "a row went idle in the middle of a document"
                continue
            # Within a segment, each target is the next input.
            assert np.array_equal(inputs[1:m], targets[: m - 1])
            if reset:
                assert current[row] is None, "reset while the previous document was unfinished"
                assert inputs[0] == BOS_ID, "documents start with BOS"
                current[row] = [step, [], None]
            else:
                assert current[row] is not None, "a new document started without reset"
                assert inputs[0] == current[row][2], "segments must overlap by one token"
            state = current[row]
            state[1].append(decode(targets[:m]))
            state[2] = targets[m - 1]
            if m < n:  # a partial segment ends its document
                docs.append((state[0], row, b"".join(state[1])))
                current[row] = None
        # A document whose length is a multiple of N ends with a full segment: it is
        # finished iff the row resets (or goes idle) next step, handled below.
        if step + 1 < len(batches):
            nxt = batches[step + 1]
            for row in range(B):
                if current[row] is not None and (nxt["reset"][row] or nxt["weights"][row].sum() == 0):
                    state = current[row]
                    docs.append((state[0], row, b"".join(state[1])))
                    current[row] = None
    return sorted(docs)


# ------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_constants():
    assert (PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 259)
    data = bytes(range(256)) + b"\xff\xfe\x00abc"
    ids = encode(data)
    assert ids.dtype == np.int32 and ids.tolist() == list(data)
    assert decode(ids) == data
    assert decode([BOS_ID, 104, 105, PAD_ID, EOS_ID]) == b"hi"
    assert encode(b"").shape == (0,)


# ---------------------------------------------------------------------------- corpus


def test_list_directory(corpus: Path):
    docs = list_documents(str(corpus))
    relpaths = [d.relpath for d in docs]
    assert relpaths == sorted(relpaths)
    assert "binary.bin" in relpaths and "empty.txt" in relpaths
    assert "d1/deep/doc01.txt" in relpaths and "d0/doc00.txt" in relpaths
    assert len(docs) == len(LENGTHS) + 2
    assert not any(r.startswith(".") or "__pycache__" in r or "/." in r for r in relpaths)
    for d in docs:
        assert os.path.isfile(d.path) and d.path.endswith(d.relpath)
    assert read_document(docs[relpaths.index("binary.bin")]) == b"\xff\xfe\x00abc"


def test_list_glob_and_single_file(corpus: Path):
    docs = list_documents(str(corpus) + "/**/*.txt")
    relpaths = [d.relpath for d in docs]
    assert relpaths == sorted(relpaths)
    assert "binary.bin" not in relpaths and "empty.txt" in relpaths
    assert "d1/deep/doc01.txt" in relpaths and len(docs) == len(LENGTHS) + 1

    docs = list_documents(str(corpus) + "/d*/deep/*.txt")
    assert docs and all(d.relpath.split("/")[1] == "deep" for d in docs)

    docs = list_documents(str(corpus / "binary.bin"))
    assert [d.relpath for d in docs] == ["binary.bin"]
    assert read_document(docs[0]) == b"\xff\xfe\x00abc"


def test_symlinked_directories_are_not_followed(corpus: Path):
    os.symlink(corpus, corpus / "d0" / "loop")
    expected = len(LENGTHS) + 2
    docs = list_documents(str(corpus))
    assert len(docs) == expected and not any("loop" in d.relpath for d in docs)
    docs = list_documents(str(corpus) + "/**/*.txt")
    assert len(docs) == expected - 1 and not any("loop" in d.relpath for d in docs)


def test_a_glob_over_symlink_loops_returns(tmp_path: Path):
    """Two link loops (a directory linking to itself and to its parent): a recursive glob that
    followed links would branch without end; it must list the one real file, promptly."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("text\n")
    os.symlink(".", tmp_path / "d" / "self")
    os.symlink("..", tmp_path / "d" / "sub" / "up")
    code = "import sys; from memtx.data.corpus import list_documents; print([d.relpath for d in list_documents(sys.argv[1])])"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d") + "/**/*.txt"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0 and out.stdout.strip() == "['a.txt']", out.stderr[-1000:]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "glob"])
def test_corpus_errors(tmp_path: Path, kind: str):
    if kind == "missing":
        source = str(tmp_path / "no" / "such" / "path")
    elif kind == "empty_dir":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / ".hidden").write_bytes(b"x")
        source = str(tmp_path / "empty")
    else:
        source = str(tmp_path / "*.nothing")
    with pytest.raises(CorpusError) as info:
        list_documents(source)
    message = str(info.value)
    assert source in message and "\n" not in message


def test_stdlib_corpus():
    docs = list_documents("stdlib")
    assert len(docs) > 1000
    assert all(d.relpath.endswith(".py") for d in docs)
    assert not any({"site-packages", "dist-packages"} & set(d.relpath.split("/")) for d in docs)
    assert any(d.relpath == "os.py" for d in docs)
    counts = Counter(split_of(d.relpath) for d in docs)
    for split in ("validation", "test"):
        assert 0.003 * len(docs) <= counts[split] <= 0.03 * len(docs), counts
    assert counts["train"] > 0.9 * len(docs)


def test_splits(corpus: Path):
    # Pinned: a document's split is part of every recorded result (the default run's validation
    # documents); Python's salted hash() or another digest would move them between processes or
    # versions, which comparing the function with itself in one process never showed.
    assert [split_of(n) for n in ("distutils/command/clean.py", "encodings/iso8859_15.py", "dbm/__init__.py",
                                  "encodings/cp1256.py", "json/decoder.py")] == \
        ["validation", "validation", "test", "test", "train"]
    assert [split_of(f"f{i}.txt", (1, 1, 1)) for i in (0, 1, 3)] == ["train", "validation", "validation"]
    assert split_of("a/b.txt", (1, 0, 0)) == "train"
    assert split_of("a/b.txt", (0, 0, 1)) == "test"
    assert split_of("a/b.txt", (0, 5, 0)) == "validation"
    # A balanced split of many names: disjoint, covering, order-preserving.
    many = [Document(relpath=f"f{i}.txt", path=f"/x/f{i}.txt") for i in range(300)]
    parts = {s: split_documents(many, s, (1, 1, 1)) for s in ("train", "validation", "test")}
    seen = [d.relpath for p in parts.values() for d in p]
    assert sorted(seen) == sorted(d.relpath for d in many) and len(set(seen)) == len(seen)
    for part in parts.values():
        assert 50 < len(part) < 150
        assert part == sorted(part, key=many.index)


def test_split_errors(corpus: Path):
    docs = list_documents(str(corpus))
    with pytest.raises(CorpusError, match="nonsense"):
        split_documents(docs, "nonsense")
    with pytest.raises(CorpusError) as info:
        split_documents(docs, "validation", (1, 0, 0))
    message = str(info.value)
    assert "validation" in message and str(corpus) in message and "\n" not in message


def test_unreadable_document_does_not_crash(corpus: Path, caplog: pytest.LogCaptureFixture):
    docs = list_documents(str(corpus))
    vanished = next(d for d in docs if d.relpath == "d0/doc00.txt")
    os.remove(vanished.path)
    with caplog.at_level(logging.WARNING):
        assert read_document(vanished) == b""
    assert len(caplog.records) == 1 and vanished.path in caplog.records[0].getMessage()

    def failing_read(doc: Document) -> bytes:
        if doc.relpath == "binary.bin":
            raise OSError("permission denied")
        return read_document(doc)

    # A stream skips the vanished document and counts it ...
    by_content = contents(docs)
    stream = file_stream(docs, 2, N, shuffle=False, repeat=False)
    batches = run_stream(stream, 1000)
    assert {data for _, _, data in check_and_collect(batches)} == set(by_content)
    assert stream.skipped == 1
    # ... and one whose read_fn raises OSError.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stream = file_stream(docs, 2, N, shuffle=False, repeat=False, read_fn=failing_read)
        batches = run_stream(stream, 1000)
    assert {data for _, _, data in check_and_collect(batches)} == set(by_content) - {b"\xff\xfe\x00abc"}
    assert stream.skipped == 1  # read_document turns the vanished file into b"": empty, not counted
    assert any("binary.bin" in r.getMessage() for r in caplog.records)
    assert count_tokens(docs, failing_read) == count_tokens(docs) - 6


def test_unreadable_permissions():
    """A file its reader may not open reads as b"" with one warning. Root reads any file (CI runs
    as root, where this test used to skip), so the read runs in a child process as the
    unprivileged user 65534 when this one is root, with a readable file beside it as the control."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="memtx-perm-") as name:
        folder = Path(name)
        os.chmod(folder, 0o755)
        (folder / "open.txt").write_bytes(b"readable")
        (folder / "closed.txt").write_bytes(b"secret")
        os.chmod(folder / "closed.txt", 0)
        # privileges dropped after the imports (the interpreter itself may sit where nobody can read)
        code = ("import os, sys; from memtx.data.corpus import Document, read_document; "
                "os.geteuid() == 0 and os.setuid(65534); "
                "print([read_document(Document(relpath=n, path=sys.argv[1] + '/' + n)) for n in ('open.txt', 'closed.txt')])")
        out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                             cwd=folder, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[b'readable', b'']"
    assert out.stderr.count("cannot read document") == 1 and "closed.txt" in out.stderr, out.stderr


# ---------------------------------------------------------------------------- stream


@pytest.mark.parametrize("batch_size", [1, 3, 20])
def test_eval_stream_visits_every_document_once_in_order(corpus: Path, batch_size: int):
    docs = list_documents(str(corpus))
    stream = file_stream(docs, batch_size, N, shuffle=False, repeat=False)
    batches = run_stream(stream, 1000)
    assert stream.next_batch() is None and stream.next_batch() is None  # the stream ended
    assert batches[0]["reset"].tolist() == [i < len(docs) - 1 for i in range(batch_size)]
    emitted = check_and_collect(batches)
    by_content = contents(docs)
    # Every non-empty document, exactly once, assigned in the given order (row 0 first).
    order = [by_content[data] for _, _, data in emitted]
    assert order == [d.relpath for d in docs if d.relpath in by_content.values()]
    assert "empty.txt" not in order
    assert len(batches) >= sum(-(-(n) // N) for n in LENGTHS) / batch_size
    # The iterator protocol gives the same batches.
    again = list(file_stream(docs, batch_size, N, shuffle=False, repeat=False))
    assert len(again) == len(batches)
    for a, b in zip(again, batches):
        for key in a:
            assert np.array_equal(a[key], b[key])


def test_segment_count_per_document(tmp_path: Path):
    # A document of L bytes takes ceil(L / N) segments: exactly N bytes fit in one.
    for length in (1, N - 1, N, N + 1, 3 * N):
        path = tmp_path / f"doc{length}.txt"
        path.write_bytes(b"x" * length)
        stream = file_stream(list_documents(str(path)), 1, N, shuffle=False, repeat=False)
        batches = run_stream(stream, 100)
        assert len(batches) == -(-length // N), length
        assert batches[-1]["weights"].sum() == length - (len(batches) - 1) * N


def record_reads(docs: list[Document]) -> tuple[list[str], object]:
    """A read_fn that logs the relpath of every document read."""
    log: list[str] = []

    def read(doc: Document) -> bytes:
        log.append(doc.relpath)
        return read_document(doc)

    return log, read


def test_train_stream_epochs_and_no_sharing(corpus: Path):
    docs = list_documents(str(corpus))
    n, B = len(docs), 3
    by_content = contents(docs)
    content_of = {relpath: data for data, relpath in by_content.items()}
    log, read = record_reads(docs)
    stream = file_stream(docs, B, N, shuffle=True, seed=7, repeat=True, read_fn=read)
    holder: list[tuple[str, int] | None] = [None] * B  # per row: (document, epoch drawn)
    for _ in range(60):
        drawn_before = len(log)
        batch = stream.next_batch()
        assert batch is not None and batch["weights"][:, 0].all()  # rows never idle
        # Rows take newly drawn (non-empty) documents in row order.
        new = [r for r in log[drawn_before:] if r in by_content.values()]
        resets = np.flatnonzero(batch["reset"]).tolist()
        assert len(new) == len(resets)
        first_draw = drawn_before
        for row, relpath in zip(resets, new):
            first_draw = log.index(relpath, first_draw) + 1
            holder[row] = (relpath, (first_draw - 1) // n)
            first_segment = decode(batch["targets"][row][batch["weights"][row] > 0])
            assert content_of[relpath].startswith(first_segment)
        held = [h for h in holder if h is not None]
        assert len(held) == len(set(held)), "two rows share a document within an epoch"
    # Reads follow the seeded per-epoch permutations.
    epochs = [log[e * n : (e + 1) * n] for e in range(len(log) // n)]
    assert len(epochs) >= 3
    for e, order in enumerate(epochs):
        perm = np.random.default_rng([7, e]).permutation(n)
        assert order == [docs[i].relpath for i in perm]
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream.epoch == len(log) // n
    assert "empty.txt" in epochs[0]  # empty documents are drawn, then skipped


def test_train_stream_is_deterministic_per_seed(corpus: Path):
    docs = list_documents(str(corpus))

    def targets(seed: int) -> np.ndarray:
        stream = file_stream(docs, 2, N, shuffle=True, seed=seed, repeat=True)
        return np.stack([b["targets"] for b in run_stream(stream, 40)])

    assert np.array_equal(targets(1), targets(1))
    assert not np.array_equal(targets(1), targets(2))


def test_train_stream_reproduces_documents(corpus: Path):
    docs = list_documents(str(corpus))
    stream = file_stream(docs, 4, N, shuffle=True, seed=3, repeat=True)
    emitted = check_and_collect(run_stream(stream, 200))
    by_content = contents(docs)
    assert all(data in by_content for _, _, data in emitted)
    assert {data for _, _, data in emitted} == set(by_content)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_resume(corpus: Path, mode: str, k: int):
    docs = list_documents(str(corpus))
    kwargs = dict(shuffle=mode == "train", repeat=mode == "train", seed=5)
    original = file_stream(docs, 3, N, **kwargs)
    run_stream(original, k)
    state = json.loads(json.dumps(original.state()))
    expected = run_stream(original, 30)
    restored = file_stream(docs, 3, N, **kwargs)
    restored.restore(state)
    via_kwarg = file_stream(docs, 3, N, **kwargs, state=state)
    for stream in (restored, via_kwarg):
        got = run_stream(stream, 30)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            for key in a:
                assert np.array_equal(a[key], b[key]), key
        assert stream.state() == original.state()


def test_a_loss_mask_weights_the_targets_it_names_across_segments_and_a_resume(tmp_path: Path):
    """With `loss_mask` (here the recall task's answers) each row's loss_weights are the mask of
    its document at the row's targets, segment after segment and after a restore; weights (what
    is read and written to memory) stay 1 on every valid target."""
    from memtx.data import kv_recall
    paths = kv_recall.write_corpus(str(tmp_path / "kv"), 5, seed=1, spec=kv_recall.KVSpec(length=60))
    docs = list_documents(str(tmp_path / "kv"))
    kwargs = dict(shuffle=True, repeat=True, seed=2, loss_mask=kv_recall.answer_mask)
    stream = file_stream(docs, 2, N, **kwargs)
    masks = {p: kv_recall.answer_mask(open(p, "rb").read()) for p in paths}
    by_ids = {open(p, "rb").read(): masks[p] for p in paths}
    seen = 0
    for step in range(20):
        if step == 7:  # the rest from a restored stream
            stream = file_stream(docs, 2, N, **kwargs, state=json.loads(json.dumps(stream.state())))
        batch = stream.next_batch()
        for row, seg in enumerate(stream.last_segments):
            _, pos, m, ids = seg
            mask = by_ids[bytes(ids.astype(np.uint8))]
            assert np.array_equal(batch["loss_weights"][row, :m], mask[pos:pos + m])
            assert np.all(batch["loss_weights"][row, m:] == 0) and np.all(batch["weights"][row, :m] == 1)
            seen += int(mask[pos:pos + m].sum())
    assert seen > 20  # answers were met (the check above can fail)


def test_state_format_and_validation(corpus: Path):
    docs = list_documents(str(corpus))
    stream = file_stream(docs, 3, N, shuffle=True, repeat=True, seed=1)
    run_stream(stream, 4)
    state = stream.state()
    assert len(state["row_doc"]) == len(state["row_pos"]) == 3
    assert json.loads(json.dumps(state)) == state
    positions = [p for p in state["row_doc"] if p is not None] + [state["next"]]
    assert all(len(p) == 2 and all(type(x) is int for x in p) for p in positions)
    assert all(type(x) is int for x in state["row_pos"])
    bad_streams = [
        file_stream(docs, 4, N, shuffle=True, repeat=True, seed=1),
        file_stream(docs[1:], 3, N, shuffle=True, repeat=True, seed=1),
        file_stream(docs[::-1], 3, N, shuffle=True, repeat=True, seed=1),
        file_stream(docs, 3, N, shuffle=True, repeat=True, seed=2),
        file_stream(docs, 3, N, shuffle=True, repeat=True, seed=1, num_shards=2),
    ]
    for bad in bad_streams:
        with pytest.raises(ValueError) as info:
            bad.restore(state)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        stream.restore({**state, "row_doc": [[0, 1], [0, 2]]})
    with pytest.raises(ValueError):  # a row's document drawn after `next`
        stream.restore({**state, "row_doc": [[0, 1], [0, 2], [5, 0]]})


def test_sharding_partitions_documents(corpus: Path):
    docs = list_documents(str(corpus))
    by_content = contents(docs)
    seen = []
    for shard in range(2):
        stream = file_stream(docs, 2, N, shuffle=False, repeat=False, shard_index=shard, num_shards=2)
        assert [d.relpath for d in stream.source.docs] == [d.relpath for d in docs[shard::2]]
        seen.append({by_content[data] for _, _, data in check_and_collect(run_stream(stream, 1000))})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(by_content.values())


def test_empty_corpus(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_bytes(b"")
    docs = list_documents(str(tmp_path))
    with pytest.raises(CorpusError):
        file_stream(docs, 2, N, shuffle=True, repeat=True).next_batch()
    assert file_stream(docs, 2, N, shuffle=False, repeat=False).next_batch() is None


def test_count_tokens(corpus: Path):
    docs = list_documents(str(corpus))
    assert count_tokens(docs) == sum(LENGTHS) + len(b"\xff\xfe\x00abc")


def test_stdlib_stream_smoke():
    docs = split_documents(list_documents("stdlib"), "train")
    stream = file_stream(docs, 8, 512, shuffle=True, seed=0, repeat=True)
    batches = run_stream(stream, 50)
    assert len(batches) == 50
    assert batches[0]["reset"].all() and batches[0]["inputs"][:, 0].tolist() == [BOS_ID] * 8
    check_and_collect(batches)


def test_file_names_that_are_not_utf8_are_read_split_and_fingerprinted(tmp_path):
    """A corpus file named with bytes that are not UTF-8 (Python holds them as surrogates) was a
    traceback in the split; names that are UTF-8 hash to the same split as before (their bytes)."""
    import hashlib
    import os

    from memtx.data.corpus import list_documents, split_of
    from memtx.data.fingerprint import corpus_fingerprint
    from memtx.config import DataConfig

    (tmp_path / os.fsdecode(b"\xff\xfe.txt")).write_bytes(b"bytes " * 50)
    (tmp_path / "caf\u00e9.txt").write_bytes(b"text " * 50)
    docs = list_documents(str(tmp_path))
    assert len(docs) == 2
    for doc in docs:
        assert split_of(doc.relpath) in ("train", "validation", "test")
    name = "caf\u00e9.txt"
    bucket = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 100
    assert split_of(name) == ("train" if bucket < 98 else "validation" if bucket < 99 else "test")
    assert corpus_fingerprint(DataConfig(corpus=str(tmp_path)))["documents"] == 2
