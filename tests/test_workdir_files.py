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


def damaged_values(valid: dict):
    """(name, JSON value) in place of `valid`: each other JSON type, and each field given each wrong type."""
    for other in ([], 7, "text", None):
        yield f"json_{type(other).__name__}", other
    for key in valid:
        for wrong in WRONG_VALUES:
            if not isinstance(wrong, type(valid[key])) or isinstance(wrong, bool) != isinstance(valid[key], bool):
                yield f"{key}={wrong!r}", {**valid, key: wrong}


FILE_DAMAGES = ("truncated", "empty", "binary", "directory")


def damage_file(path, how: str, valid: dict) -> None:
    text = json.dumps(valid)
    {"truncated": lambda: path.write_text(text[: len(text) // 2]),
     "empty": lambda: path.write_text(""),
     "binary": lambda: path.write_bytes(bytes(range(256)) * 4),
     "directory": lambda: path.mkdir()}[how]()


def damages(valid: dict):
    """(name, how to damage a path) for a file whose valid content is `valid` (a JSON object)."""
    for how in FILE_DAMAGES:
        yield how, lambda p, how=how: damage_file(p, how, valid)
    for name, value in damaged_values(valid):
        yield name, lambda p, value=value: p.write_text(json.dumps(value))


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



def _streams(corpus_dir):
    """(a stream that has run a few batches, a fresh one over the same source): 2 shards of 2 rows."""
    from memtx.data import FileSource, list_documents
    from memtx.data.stream import ShardedStream

    docs = list_documents(str(corpus_dir))

    def make():
        return ShardedStream(lambda s, n: FileSource(docs, shuffle=True, repeat=True, seed=1, shard_index=s,
                                                     num_shards=n), 4, 16, num_shards=2)
    ran = make()
    for _ in range(3):
        ran.next_batch()
    return ran, make


@pytest.fixture(scope="module")
def stream_states(tmp_path_factory):
    from tests.helpers import make_corpus
    ran, make = _streams(make_corpus(tmp_path_factory.mktemp("stream") / "corpus", num_docs=4))
    return json.loads(json.dumps(ran.state())), make


def _restore_or_one_line(make, states) -> None:
    """The checkpoint's data item read back: a ValueError of one line (train.py names the file), or a
    stream that then streams."""
    stream = make()
    try:
        stream.restore(states)
    except ValueError as e:
        _one_line(e)
    else:
        stream.next_batch()


def test_stream_state_damages(stream_states):
    """Each shard's stream state, and the {shard: state} map around it, given every damaged value."""
    states, make = stream_states
    _restore_or_one_line(make, states)  # the valid one restores
    cases = [("shards", value) for _, value in damaged_values(states)]
    cases += [("shard 0", {**states, "0": value}) for _, value in damaged_values(states["0"])]
    assert len(cases) > 40
    for _, value in cases:
        _restore_or_one_line(make, value)
    bad = {**states, "0": {**states["0"], "row_pos": [-1, 0]}}
    with pytest.raises(ValueError, match="row_pos"):
        make().restore(bad)


# Property tests (hypothesis): any JSON value, in place of the whole file or of any one field at any
# depth, and any bytes, read by each reader: its one-line error or a usable value, nothing else.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


def _replaced(value, path, new):
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def mutations(valid):
    """Any JSON in place of `valid` or of one of its parts (at any depth)."""
    return st.builds(_replaced, st.just(valid), st.sampled_from(list(_paths(valid))), JSON)


def contents(valid):
    """What a damaged file may hold: `valid` with one part replaced, any JSON, or any bytes."""
    return st.one_of(mutations(valid).map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))


# 60 examples each here (about 1 s a test); MEMTX_PROPERTY_EXPLORE=1 (tests/conftest.py) tries 1000 fresh ones.
PROPERTY = settings(max_examples=1000 if os.environ.get("MEMTX_PROPERTY_EXPLORE") else 60,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(data=contents(RUN_INFO))
def test_run_info_property(tmp_path, data):
    (tmp_path / "run_info.json").write_bytes(data)
    try:
        info = workdir_files.read_run_info(str(tmp_path))
    except ConfigError as e:
        assert "run_info.json" in _one_line(e)
    else:
        assert isinstance(info.get("corpus", {"sha256": ""})["sha256"], str)
        assert all(isinstance(p["sha256"], str) for p in info.get("previous_corpus", []))


@PROPERTY
@given(data=contents(METRICS_LINE))
def test_metrics_line_property(data):
    record = workdir_files.metrics_record(data.decode("utf-8", "replace").replace("\n", " ") + "\n")
    if record is not None:
        assert type(record["step"]) is int and record["step"] >= 0
        assert all(type(record[k]) in (int, float) for k in ("loss", "grad_norm", "learning_rate") if k in record)


@PROPERTY
@given(data=contents(RESULT))
def test_result_property(tmp_path, data):
    path = tmp_path / "eval_validation_x.json"
    path.write_bytes(data)
    result = workdir_files.read_result(str(path))
    if result is not None:
        assert all(type(result[k]) in (int, float) for k in ("nll_sum", "tokens", "perplexity"))
        assert isinstance(result["documents_nll"], dict)


@PROPERTY
@given(data=contents(FIT))
def test_cache_fit_property(tmp_path, data):
    path = tmp_path / "cache_fit_x.json"
    path.write_bytes(data)
    try:
        record, spec = cache_tuning._read_fit(str(path))
    except (ConfigError, UsageError) as e:
        assert str(path) in _one_line(e)
    else:
        import math
        assert all(math.isfinite(float(record[k])) for k in ("theta", "lam", "fill"))
        assert type(spec.size) is int and type(spec.k) is int and type(spec.normalize) is bool


@PROPERTY
@given(data=contents({"step": 3, "files": {"params/a": [10, 123]}}))
def test_integrity_record_property(tmp_path, data):
    step = tmp_path / "3"
    (step / "params").mkdir(parents=True, exist_ok=True)
    (step / "params" / "a").write_bytes(b"0123456789")
    (step / INTEGRITY_FILE).write_bytes(data)
    problem = verify(str(step))
    assert problem is None or "\n" not in problem


@PROPERTY
@given(data=contents({"workdir": "/somewhere/run"}))
def test_owner_record_property(tmp_path, data):
    (tmp_path / checkpoint_owner.OWNER_FILE).write_bytes(data)
    try:
        owner = checkpoint_owner.read_owner(str(tmp_path))
    except ConfigError as e:
        assert checkpoint_owner.OWNER_FILE in _one_line(e)
    else:
        assert isinstance(owner, str)


@PROPERTY
@given(data=contents(CONFIG))
def test_config_json_property(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    try:
        validate(load_json(str(tmp_path / "config.json")), 8)
    except ConfigError as e:
        _one_line(e)


@PROPERTY
@given(value=st.data())
def test_stream_state_property(stream_states, value):
    states, make = stream_states
    _restore_or_one_line(make, value.draw(mutations(states)))
