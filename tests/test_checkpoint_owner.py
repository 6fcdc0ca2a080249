"""A checkpoint directory outside the work directory belongs to one run (memtx/checkpoint_owner.py):
another run is refused in one line before anything is written, `--adopt-checkpoints` takes it
over on purpose, and a resumed run cannot silently change where its checkpoints are."""

from __future__ import annotations

import json

import pytest

from memtx import checkpoint_owner
from memtx.config import ConfigError
from memtx.train import train
from tests.helpers import make_corpus, tiny_config


def _cfg(checkpoint_dir="", **train_options):
    cfg = tiny_config(**train_options)
    cfg.train.checkpoint_dir = str(checkpoint_dir)
    return cfg


def _message(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_run_claims_its_checkpoint_directory_and_another_run_is_refused(tmp_path):
    ckpt, a, b = tmp_path / "ckpt", tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir(), ckpt.mkdir()
    cfg = _cfg(ckpt)
    checkpoint_owner.check(cfg, None, str(a), adopt=False)
    lock = checkpoint_owner.claim(cfg, str(a))
    assert checkpoint_owner.read_owner(str(ckpt)) == str(a.resolve())
    (ckpt / "3").mkdir()
    # While run a holds it: locked; after it ends: owned by a.
    assert "in use by pid" in _message(checkpoint_owner.claim, cfg, str(b))
    lock.release()
    message = _message(checkpoint_owner.check, cfg, None, str(b), False)
    assert f"belongs to the run in '{a.resolve()}' (steps 3..3)" in message and "--adopt-checkpoints" in message
    checkpoint_owner.check(cfg, None, str(a), adopt=False)  # its own run resumes
    checkpoint_owner.check(cfg, None, str(b), adopt=True)  # adopted on purpose: b becomes the owner
    checkpoint_owner.claim(cfg, str(b)).release()
    assert checkpoint_owner.read_owner(str(ckpt)) == str(b.resolve())
    assert "belongs to the run in" in _message(checkpoint_owner.check, cfg, None, str(a), False)


def test_unowned_checkpoints_are_refused_to_a_new_run_and_a_damaged_record_is_one_line(tmp_path):
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    (ckpt / "6").mkdir(parents=True)
    run.mkdir()
    cfg = _cfg(ckpt)
    assert "already holds checkpoints (steps 6..6)" in _message(checkpoint_owner.check, cfg, None, str(run), False)
    checkpoint_owner.check(cfg, cfg, str(run), adopt=False)  # written before owners were recorded, by this run
    for damage in ("{not json", json.dumps({"workdir": 5}), json.dumps(["a"])):
        (ckpt / checkpoint_owner.OWNER_FILE).write_text(damage)
        assert checkpoint_owner.OWNER_FILE in _message(checkpoint_owner.check, cfg, None, str(run), False)


def test_the_default_checkpoints_and_remote_ones_keep_no_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for cfg in (_cfg(""), _cfg(run / "checkpoints"), _cfg("gs://bucket/run/checkpoints")):
        checkpoint_owner.check(cfg, None, str(run), adopt=False)
        assert checkpoint_owner.claim(cfg, str(run)) is None
    assert not (run / "checkpoints" / checkpoint_owner.OWNER_FILE).exists()


def test_a_resumed_run_cannot_move_its_checkpoints_without_adopting(tmp_path):
    saved, moved = _cfg(""), _cfg(tmp_path / "elsewhere")
    message = _message(checkpoint_owner.check, moved, saved, str(tmp_path / "run"), False)
    assert f"saved its checkpoints in '{tmp_path / 'run' / 'checkpoints'}'" in message
    assert f"now names '{tmp_path / 'elsewhere'}'" in message
    checkpoint_owner.check(moved, saved, str(tmp_path / "run"), adopt=True)


@pytest.mark.slow
def test_an_adopted_directory_continues_from_its_steps(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus", num_docs=3, max_bytes=1500))
    ckpt = tmp_path / "shared_checkpoints"
    first = _cfg(ckpt, steps=4, checkpoint_every=2, stop_after=2)
    first.data.corpus = corpus
    train(first, str(tmp_path / "a"))
    second = _cfg(ckpt, steps=4, checkpoint_every=2)
    second.data.corpus = corpus
    assert "belongs to the run in" in _message(train, second, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "config.json").exists()  # refused before anything was written
    summary = train(second, str(tmp_path / "b"), adopt_checkpoints=True)
    assert summary["start_step"] == 2 and summary["end_step"] == 4
    assert checkpoint_owner.read_owner(str(ckpt)) == str((tmp_path / "b").resolve())
