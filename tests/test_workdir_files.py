"""Every file memtx reads back from a work directory, damaged in every way, read by every reader:
one line naming the file (or, where memtx can do without it, a note and the file's good part),
never a traceback. The damages are generated: cut short, empty, binary garbage, a directory in
its place, each JSON type where an object is expected, and each field given each wrong type."""

from __future__ import annotations

import json
import os

import pytest

from memtx import cache_tuning, checkpoint_owner, workdir_files
from memtx.checkpoint_integrity import INTEGRITY_FILE, verify
from memtx.config import ConfigError, load_json, to_dict, validate
from memtx.errors import UsageError
from tests.helpers import tiny_config

WRONG_VALUES = [None, "x", [], {}, 3, -1.5, True]


def damages(valid: dict):
    """(name, how to damage a path) for a file whose valid content is `valid` (a JSON object)."""
    text = json.dumps(valid)
    yield "truncated", lambda p: p.write_text(text[: len(text) // 2])
    yield "empty", lambda p: p.write_text("")
    yield "binary", lambda p: p.write_bytes(bytes(range(256)) * 4)
    yield "directory", lambda p: p.mkdir()
    for other in ([], 7, "text", None):
        yield f"json_{type(other).__name__}", lambda p, other=other: p.write_text(json.dumps(other))
    for key in valid:
        for wrong in WRONG_VALUES:
            if not isinstance(wrong, type(valid[key])) or isinstance(wrong, bool) != isinstance(valid[key], bool):
                yield f"{key}={wrong!r}", lambda p, key=key, wrong=wrong: p.write_text(json.dumps({**valid, key: wrong}))


def _one_line(error: Exception) -> str:
    assert "\n" not in str(error) and str(error)
    return str(error)


def _cases(valid):
    return [pytest.param(damage, id=name) for name, damage in damages(valid)]


RUN_INFO = {"corpus": {"sha256": "ab" * 32, "documents": 3}, "previous_corpus": []}


@pytest.mark.parametrize("damage", _cases(RUN_INFO))
def test_run_info(tmp_path, damage):
    damage(tmp_path / "run_info.json")
    try:
        info = workdir_files.read_run_info(str(tmp_path))
    except ConfigError as e:
        assert "run_info.json" in _one_line(e)
    else:  # what it read is usable
        assert isinstance(info.get("corpus", {}).get("sha256", ""), str)


CONFIG = to_dict(tiny_config())


@pytest.mark.parametrize("damage", _cases(CONFIG) + _cases({"model": CONFIG["model"]})
                         + [pytest.param(lambda p: p.write_text(json.dumps({**CONFIG, "mesh": {**CONFIG["mesh"],
                                                                                                "rules": [[1, 2], "x"]}})),
                                         id="garbage_mesh_rules")])
def test_config_json(tmp_path, damage):
    damage(tmp_path / "config.json")
    try:
        validate(load_json(str(tmp_path / "config.json")), 8)
    except ConfigError as e:
        _one_line(e)


METRICS_LINE = {"step": 3, "loss": 2.5, "grad_norm": 0.5, "learning_rate": 0.001}


@pytest.mark.parametrize("damage", _cases(METRICS_LINE))
def test_metrics_jsonl_keeps_its_good_lines(tmp_path, damage, capsys):
    """A damaged line among good ones is skipped with a note; a directory in its place is one line."""
    bad = tmp_path / "bad"
    damage(bad)
    path = tmp_path / "metrics.jsonl"
    if bad.is_dir():
        path.mkdir()
        with pytest.raises(ConfigError) as info:
            workdir_files.read_metrics(str(tmp_path))
        assert "metrics.jsonl is a directory" in _one_line(info.value)
        return
    damaged = bad.read_bytes().replace(b"\n", b" ")
    good = [json.dumps({**METRICS_LINE, "step": s}).encode() for s in (1, 2)]
    path.write_bytes(b"\n".join([good[0], damaged, good[1]]) + b"\n")
    records = workdir_files.read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["step"] in (1, 2)] == [1, 2]
    for r in records:
        assert isinstance(r["step"], int) and isinstance(r.get("loss", 0.0), (int, float))


RESULT = {"nll_sum": 10.0, "tokens": 5, "perplexity": 7.4, "documents_nll": {"id": [], "nll": [], "tokens": []}}


@pytest.mark.parametrize("damage", _cases(RESULT))
def test_an_evaluation_result_is_evaluated_again_or_one_line(tmp_path, damage, capsys):
    path = tmp_path / "eval_validation_x.json"
    damage(path)
    try:
        result = workdir_files.read_result(str(path))
    except ConfigError as e:
        assert path.is_dir() and "is a directory" in _one_line(e)
    else:
        assert result is None or result == json.loads(path.read_text())


FIT = {"spec": {"size": 8, "scorer": "continuous"}, "fit": {"theta": 1.0, "lam": 0.1, "fill": 10.0}, "identity": {}}


@pytest.mark.parametrize("damage", _cases(FIT))
def test_a_cache_fit(tmp_path, damage):
    path = tmp_path / "cache_fit_x.json"
    damage(path)
    try:
        cache_tuning._read_fit(str(path))
    except (ConfigError, UsageError) as e:
        assert str(path) in _one_line(e)


@pytest.mark.parametrize("damage", _cases({"step": 3, "files": {"params/a": [10, 123]}}))
def test_an_integrity_record(tmp_path, damage):
    step = tmp_path / "3"
    (step / "params").mkdir(parents=True)
    (step / "params" / "a").write_bytes(b"0123456789")
    if (step / INTEGRITY_FILE).exists():
        os.remove(step / INTEGRITY_FILE)
    damage(step / INTEGRITY_FILE)
    problem = verify(str(step))
    assert problem is None or "\n" not in problem


@pytest.mark.parametrize("damage", _cases({"workdir": "/somewhere/run"}))
def test_a_checkpoint_owner_record(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    damage(ckpt / checkpoint_owner.OWNER_FILE)
    try:
        owner = checkpoint_owner.read_owner(str(ckpt))
    except ConfigError as e:
        assert checkpoint_owner.OWNER_FILE in _one_line(e)
    else:
        assert owner is None or isinstance(owner, str)


def test_the_damages_are_many():
    counts = {name: len(list(damages(valid))) for name, valid in
              (("run_info", RUN_INFO), ("config", CONFIG), ("metrics", METRICS_LINE), ("result", RESULT),
               ("fit", FIT), ("owner", {"workdir": "x"}))}
    assert sum(counts.values()) > 100, counts

