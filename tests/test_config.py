"""Configs: Python config files with presets, command-line overrides, validation before any
compilation, one-line errors naming the key, and the resolved config saved as JSON.

The tests run on the 8 CPU devices that conftest.py forces; CLI tests run `python -m memtx.train`
/ `memtx.evaluate` as subprocesses (the same XLA_FLAGS, so they also see 8 devices).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import jax
import pytest

from memtx import config as config_lib
from memtx import state as state_lib
from memtx.config_schema import choices
from memtx.config import (Config, ConfigError, MeshConfig, apply_override, from_dict, load_config_file, load_json,
                          parse_overrides, save_json, to_dict, validate)

ROOT = Path(__file__).resolve().parents[1]
TXL = str(ROOT / "configs" / "txl.py")
NUM_DEVICES = 8  # conftest.py


def txl(preset: str | None = None) -> Config:
    return load_config_file(f"{TXL}:{preset}" if preset else TXL)


def config_error(fn, *args) -> str:
    """Runs fn(*args), expects a ConfigError; returns its (one-line) message."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def override(cfg: Config, **items: str) -> Config:
    for key, text in items.items():
        apply_override(cfg, key.replace("__", "."), text)
    return cfg


def leaf_fields(node, prefix: str = ""):
    """(dotted key, type, value) for every settable field of the config, nested sections included."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], value


# ---------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize("key, text, expected", [
    ("model.num_layers", "7", 7),
    ("model.num_layers", " 12 ", 12),
    ("model.mem_len", "0", 0),
    ("optim.learning_rate", "3e-4", 3e-4),
    ("optim.learning_rate", "1", 1.0),
    ("model.dropout", "0.25", 0.25),
    ("model.pre_norm", "true", True),
    ("model.pre_norm", "True", True),
    ("model.pre_norm", "yes", True),
    ("model.pre_norm", "1", True),
    ("model.pre_norm", "false", False),
    ("model.pre_norm", "no", False),
    ("model.pre_norm", "0", False),
    ("model.dtype", "bfloat16", "bfloat16"),
    ("data.corpus", "/data/a=b/*.txt", "/data/a=b/*.txt"),
    ("name", "my_run", "my_run"),
    ("mesh.shape", "2,2,2", (2, 2, 2)),
    ("mesh.shape", "(2,2,2)", (2, 2, 2)),
    ("mesh.shape", "(2, 2, 2)", (2, 2, 2)),
    ("mesh.shape", "-1,2,1", (-1, 2, 1)),
    ("mesh.shape", "8", (8,)),
    ("mesh.shape", "(8,)", (8,)),
    ("data.split_fractions", "90,5,5", (90, 5, 5)),
    ("mesh.axes", "('a', 'b', 'c')", ("a", "b", "c")),
])
def test_override_parses_to_field_type(key, text, expected):
    cfg = txl("cpu")
    apply_override(cfg, key, text)
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    assert value == expected
    assert type(value) is type(expected), (key, text, value)


def test_override_changes_only_its_key():
    cfg, reference = txl("cpu"), txl("cpu")
    apply_override(cfg, "model.num_layers", str(reference.model.num_layers + 3))
    assert cfg.model.num_layers == reference.model.num_layers + 3
    cfg.model.num_layers = reference.model.num_layers
    assert cfg == reference


def test_every_field_can_be_set_from_its_repr():
    """Every leaf field (tuples of str and the mesh rules included) round-trips through the CLI."""
    source, target = txl("wt103"), txl("cpu")
    source.mesh.axes, source.mesh.rules = ("d", "f", "m"), (("act_batch", ("d", "f")), ("heads", "m"), ("kv", None))
    source.model.pre_norm = not target.model.pre_norm
    for key, typ, value in leaf_fields(source):
        plain = typ in (int, float, str) or choices(typ) is not None  # a Literal's names are plain words too
        text = ("true" if value else "false") if typ is bool else str(value) if plain else repr(value)
        apply_override(target, key, text)
    assert target == source


def test_parse_overrides_forms():
    assert parse_overrides(["--config.model.num_layers=4", "--config.mesh.shape", "2,2,2",
                            "--config.data.corpus=/x=y", "--config.model.mem_len", "-1"]) == [
        ("model.num_layers", "4"), ("mesh.shape", "2,2,2"), ("data.corpus", "/x=y"), ("model.mem_len", "-1")]
    assert parse_overrides([]) == []


def test_cli_parser_passes_two_token_overrides_through():
    """argparse (parse_known_args) must leave both overrides forms, negative values included, in order."""
    from memtx import train
    from memtx.cli import resolve_config

    args, rest = train.parser().parse_known_args(
        ["--config", f"{TXL}:wt103", "--workdir", "/tmp/unused", "--config.model.mem_len", "0",
         "--config.mesh.shape", "(-1,2,1)", "--config.model.pre_norm=true", "--config.optim.warmup_steps", "-1"])
    cfg = resolve_config(args.config, args.workdir, rest)
    assert cfg.name == txl("wt103").name
    assert (cfg.model.mem_len, cfg.mesh.shape, cfg.model.pre_norm, cfg.optim.warmup_steps) == (0, (-1, 2, 1), True, -1)


@pytest.mark.parametrize("args, names", [
    (["--config.model.num_layers"], "model.num_layers"),
    (["--model.num_layers=4"], "--model.num_layers=4"),
    (["4"], "'4'"),
    (["--config.model.num_layers=4", "--workdir2", "x"], "--workdir2"),
])
def test_parse_overrides_errors(args, names):
    assert names in config_error(parse_overrides, args)


def test_unknown_key_suggests_the_close_one():
    message = config_error(apply_override, txl(), "model.num_layrs", "2")
    assert "model.num_layrs" in message
    assert "did you mean 'model.num_layers'" in message


def test_unknown_key_without_close_match_lists_known_keys():
    message = config_error(apply_override, txl(), "model.zzzzzz", "2")
    assert "model.zzzzzz" in message and "num_layers" in message and "mem_len" in message


def test_unknown_section():
    message = config_error(apply_override, txl(), "modle.num_layers", "2")
    assert "modle.num_layers" in message and "did you mean 'model'" in message
    message = config_error(apply_override, txl(), "zzzz.num_layers", "2")
    assert "zzzz.num_layers" in message


def test_setting_a_section_or_indexing_a_field_is_an_error():
    cfg = txl()
    before = to_dict(cfg)
    message = config_error(apply_override, cfg, "model", "3")
    assert "'model'" in message and "section" in message
    message = config_error(apply_override, cfg, "model.num_layers.x", "3")
    assert "model.num_layers.x" in message
    assert to_dict(cfg) == before


@pytest.mark.parametrize("key, text", [
    ("model.num_layers", "abc"),
    ("model.num_layers", "4.5"),
    ("model.num_layers", ""),
    ("model.num_layers", "true"),
    ("optim.learning_rate", "fast"),
    ("model.pre_norm", "maybe"),
    ("model.pre_norm", "2"),
    ("mesh.shape", "2,x,2"),
    ("mesh.shape", "2.0,2,2"),
    ("mesh.shape", "(2,True,2)"),
    ("mesh.shape", "'a','b'"),
    ("mesh.axes", "1,2,3"),
    ("data.split_fractions", "98,,1"),
])
def test_wrong_type_names_the_key(key, text):
    cfg = txl()
    before = to_dict(cfg)
    message = config_error(apply_override, cfg, key, text)
    assert f"'{key}'" in message
    assert to_dict(cfg) == before  # a rejected override leaves the config untouched


# ---------------------------------------------------------------------------------------------
# Config files and presets


def test_default_preset_is_cpu():
    assert txl() == txl("cpu")
    assert txl("cpu") is not txl("cpu")  # fresh objects: overriding one never leaks into another


def test_text8_uses_the_enwik8_model():
    assert txl("text8").model == txl("enwik8").model


def test_config_file_errors(tmp_path):
    assert "nope.py" in config_error(load_config_file, str(tmp_path / "nope.py"))
    message = config_error(load_config_file, f"{TXL}:nope")
    assert "nope" in message and "preset" in message
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("X = 1\n")
    assert "get_config" in config_error(load_config_file, str(no_fn))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config(preset=None):\n    return {'model': {}}\n")
    assert "wrong.py" in config_error(load_config_file, str(wrong))


@pytest.mark.parametrize("preset, layers, d_model, heads, head_dim, d_ff, length", [
    ("wt103", 16, 410, 10, 41, 2100, 150),
    ("enwik8", 12, 512, 8, 64, 2048, 512),
    ("text8", 12, 512, 8, 64, 2048, 512),
])
def test_paper_presets(preset, layers, d_model, heads, head_dim, d_ff, length):
    cfg = txl(preset)
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.dim_per_head, m.d_ff) == (layers, d_model, heads, head_dim, d_ff)
    assert cfg.data.seq_len == m.mem_len == length
    assert validate(cfg, NUM_DEVICES) == (NUM_DEVICES, 1, 1)


@pytest.mark.parametrize("preset", ["cpu", "cpu_rpe", "wt103", "enwik8", "text8"])
def test_presets_validate(preset):
    cfg = txl(preset)
    shape = validate(cfg, NUM_DEVICES)
    assert math.prod(shape) == NUM_DEVICES and len(shape) == len(cfg.mesh.axes)
    # A single device always works too (every batch divides 1).
    assert validate(cfg, 1) == (1, 1, 1)


@pytest.mark.parametrize("preset", ["cpu", "wt103", "enwik8", "text8"])
def test_lamemo_presets_are_the_txl_models_with_lamemo_memory(preset):
    cfg = load_config_file(f"{ROOT / 'configs' / 'lamemo.py'}:{preset}")
    base = txl(preset)
    assert cfg.model.memory == "lamemo" and base.model.memory == "xl"
    assert cfg.name.startswith("lamemo_")
    assert validate(cfg, NUM_DEVICES) == validate(base, NUM_DEVICES)
    cfg.model.memory, cfg.name = "xl", base.name
    assert to_dict(cfg) == to_dict(base)  # everything else is the compared Transformer-XL's


@pytest.mark.parametrize("ablation, field, value", [("no_interpolation", "interpolation", False),
                                                    ("no_look_ahead", "look_ahead", False),
                                                    ("xl_encoding", "encoding", "xl")])
def test_lamemo_ablation_presets_change_one_switch(ablation, field, value):
    cfg = load_config_file(f"{ROOT / 'configs' / 'lamemo.py'}:wt103_{ablation}")
    full = load_config_file(f"{ROOT / 'configs' / 'lamemo.py'}:wt103")
    assert getattr(cfg.model.lamemo, field) == value != getattr(full.model.lamemo, field)
    validate(cfg, NUM_DEVICES)
    setattr(cfg.model.lamemo, field, getattr(full.model.lamemo, field))
    cfg.name = full.name
    assert to_dict(cfg) == to_dict(full)
    with pytest.raises(ConfigError):
        load_config_file(f"{ROOT / 'configs' / 'lamemo.py'}:wt103_no_memory")


def n_params(setup) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))


def test_enwik8_preset_has_the_papers_41m_parameters():
    setup = state_lib.build(txl("enwik8"))
    assert 40e6 < n_params(setup) < 42e6  # Transformer-XL, 12L enwik8: 41M
    assert dict(setup.mesh.shape) == {"data": NUM_DEVICES, "fsdp": 1, "model": 1}


def test_parameter_count_follows_the_config():
    """Two more layers add exactly two layers' parameters (the count is not a constant)."""
    small = state_lib.build(override(txl("cpu"), model__num_layers="2"))
    large = state_lib.build(override(txl("cpu"), model__num_layers="4"))
    m = txl("cpu").model
    per_layer = (n_params(large) - n_params(small)) // 2
    # Transformer-XL layer: q, k, v, output and relative-position projections (5 d^2, no biases),
    # the FFN with biases, and two layer norms (scale and bias).
    expected = 5 * m.d_model * m.d_model + 2 * m.d_model * m.d_ff + m.d_ff + m.d_model + 4 * m.d_model
    assert per_layer == expected


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("items, key", [
    ({"model__num_heads": "3"}, "model.num_heads"),  # 128 % 3, head_dim 0
    ({"model__mem_len": "-1"}, "model.mem_len"),
    ({"model__num_layers": "0"}, "model.num_layers"),
    ({"model__d_model": "-4"}, "model.d_model"),
    ({"model__head_dim": "-1"}, "model.head_dim"),
    ({"model__dropout": "1.0"}, "model.dropout"),
    ({"model__dtype": "float16"}, "model.dtype"),
    ({"data__seq_len": "0"}, "data.seq_len"),
    ({"data__split_fractions": "98,1"}, "data.split_fractions"),
    ({"data__eval_split": "valid"}, "data.eval_split"),
    ({"optim__learning_rate": "0"}, "optim.learning_rate"),
    ({"train__steps": "0"}, "train.steps"),
    ({"optim__warmup_steps": "999999"}, "optim.warmup_steps"),  # > train.steps
    ({"mesh__shape": "2,2,2", "data__batch_size": "6"}, "data.batch_size"),  # dp = data x fsdp = 4
    ({"mesh__shape": "2,2,2", "data__eval_batch_size": "2"}, "data.eval_batch_size"),
    ({"mesh__shape": "2,2"}, "mesh.shape"),  # 2 sizes for 3 axes
    ({"mesh__shape": "4,4,1"}, "mesh.shape"),  # 16 devices, 8 available
    ({"mesh__shape": "3,-1,1"}, "mesh.shape"),
    ({"mesh__shape": "-1,-1,1"}, "mesh.shape"),
    ({"mesh__shape": "-1,0,1"}, "mesh.shape"),
    ({"mesh__rules": "(('act_batch', ('data', 'pipeline')),)"}, "mesh.rules"),
])
def test_validate_names_the_key(items, key):
    cfg = override(txl("cpu"), **items)
    assert key in config_error(validate, cfg, NUM_DEVICES)


def test_heads_not_dividing_width_is_fine_with_explicit_head_dim():
    cfg = override(txl("cpu"), model__num_heads="3")
    assert "model.num_heads" in config_error(validate, cfg, NUM_DEVICES)
    apply_override(cfg, "model.head_dim", "40")
    validate(cfg, NUM_DEVICES)


def test_mesh_for_other_device_count():
    cfg = override(txl("cpu"), mesh__shape="2,2,2")
    assert validate(cfg, 8) == (2, 2, 2)
    message = config_error(validate, cfg, 4)
    assert "mesh.shape" in message and "4" in message


def test_a_mesh_smaller_than_the_devices_takes_the_first_ones(monkeypatch):
    import jax
    from memtx import sharding
    cfg = override(txl("cpu"), mesh__shape="2,2,1")
    assert validate(cfg, NUM_DEVICES) == (2, 2, 1)
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 1}
    assert list(mesh.devices.flat) == jax.devices()[:4]
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # across processes a mesh must span every device
    message = config_error(sharding.make_mesh, cfg)
    assert "mesh.shape" in message and "4 of the 8 devices" in message and "\n" not in message


@pytest.mark.parametrize("shape, devices, resolved", [
    ((-1, 2, 1), 8, (4, 2, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((1, 1, -1), 4, (1, 1, 4)),
])
def test_mesh_minus_one_fills_remaining_devices(shape, devices, resolved):
    cfg = txl("cpu")
    cfg.mesh = MeshConfig(shape=shape)
    cfg.data.batch_size = cfg.data.eval_batch_size = 16
    assert validate(cfg, devices) == resolved


def test_batch_divisibility_uses_data_and_fsdp_axes():
    cfg = override(txl("cpu"), mesh__shape="2,2,2", data__batch_size="4", data__eval_batch_size="4")
    validate(cfg, NUM_DEVICES)  # dp = 4
    apply_override(cfg, "mesh.shape", "1,1,8")
    validate(cfg, NUM_DEVICES)  # dp = 1: the model axis does not split the batch
    apply_override(cfg, "mesh.shape", "8,1,1")
    message = config_error(validate, cfg, NUM_DEVICES)
    assert "data.batch_size" in message and "8" in message


def test_wt103_with_a_model_axis_not_dividing_the_heads():
    ok = override(txl("wt103"), mesh__shape="4,1,2")  # 10 heads / 2
    setup = state_lib.build(ok)
    assert dict(setup.mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
    bad = override(txl("wt103"), mesh__shape="2,1,4")  # 10 heads / 4
    validate(bad, NUM_DEVICES)  # the config alone is consistent; the parameter shapes are not
    message = config_error(state_lib.build, bad)
    assert "parameter '" in message and "attn" in message and "10" in message and "mesh" in message


# ---------------------------------------------------------------------------------------------
# Nothing is compiled before a bad config is rejected


class JitCalled(AssertionError):
    pass


@pytest.fixture
def no_compilation(monkeypatch, without_session_cache):
    """jax.jit raises; every XLA backend compilation (eager primitives included) is recorded (with
    the session's persistent cache off: a program loaded from it is not a backend compilation)."""
    compiled = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", "?"))

    def forbidden_jit(*args, **kwargs):
        raise JitCalled("jax.jit called")

    monkeypatch.setattr(jax, "jit", forbidden_jit)
    jax.clear_caches()  # so that work done by earlier tests cannot hide a compilation
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("items, key", [
    ({"data__batch_size": "6"}, "data.batch_size"),
    ({"model__mem_len": "-1"}, "model.mem_len"),
    ({"model__num_heads": "3"}, "model.num_heads"),
    ({"mesh__shape": "4,4,1"}, "mesh.shape"),
])
def test_bad_config_fails_in_build_before_any_compilation(no_compilation, items, key):
    cfg = override(txl("cpu"), **items)
    assert key in config_error(state_lib.build, cfg)
    assert no_compilation == []


def test_build_never_jits(no_compilation):
    """Positive control for the fixture: a good config builds abstractly without jax.jit."""
    setup = state_lib.build(txl("enwik8"))
    assert n_params(setup) > 0
    with pytest.raises(JitCalled):
        state_lib.init_state(setup, 0)  # the real initialisation does go through jax.jit


def test_sharding_error_in_build_comes_before_any_compilation(no_compilation):
    cfg = override(txl("wt103"), mesh__shape="2,1,4")
    assert "parameter '" in config_error(state_lib.build, cfg)
    assert no_compilation == [], f"compiled before rejecting the config: {no_compilation}"


# ---------------------------------------------------------------------------------------------
# JSON round trip and the resolved config in the work directory


@pytest.mark.parametrize("preset", ["cpu", "wt103", "enwik8"])
def test_dict_round_trip(preset):
    cfg = override(txl(preset), model__num_layers="3", mesh__shape="(2,-1,1)", model__pre_norm="true")
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("preset", ["cpu", "wt103", "enwik8"])
def test_json_round_trip(tmp_path, preset):
    cfg = override(txl(preset), model__num_layers="3", mesh__shape="(2,-1,1)", model__pre_norm="true",
                   optim__learning_rate="1e-4", data__corpus="/data/x")
    path = str(tmp_path / "config.json")
    save_json(cfg, path)
    with open(path) as f:
        data = json.load(f)
    assert data["model"]["num_layers"] == 3 and data["mesh"]["shape"] == [2, -1, 1]
    loaded = load_json(path)
    assert loaded == cfg
    assert isinstance(loaded.mesh.shape, tuple) and isinstance(loaded.model, config_lib.ModelConfig)
    assert validate(loaded, NUM_DEVICES) == validate(cfg, NUM_DEVICES)


def test_json_round_trip_of_every_rule(tmp_path):
    """The mesh rules (nested tuples and None) survive JSON exactly, not as lists."""
    cfg = txl("cpu")
    path = str(tmp_path / "config.json")
    save_json(cfg, path)
    loaded = load_json(path)
    for (name, target), (loaded_name, loaded_target) in zip(cfg.mesh.rules, loaded.mesh.rules, strict=True):
        assert (loaded_name, loaded_target) == (name, target), name
        assert type(loaded_target) is type(target), name


def test_train_writes_the_resolved_config_before_compiling(tmp_path, monkeypatch):
    from memtx import train as train_lib
    from memtx.cli import resolve_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 50)
    workdir = tmp_path / "work"
    cfg = resolve_config(f"{TXL}:cpu", None, [f"--config.data.corpus={corpus}", "--config.model.num_layers", "2",
                                               "--config.data.split_fractions=1,0,0", "--config.mesh.shape=(-1,2,1)"])

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # the state is restored or initialised right after the config is saved

    monkeypatch.setattr(train_lib, "_restore_or_init", stop)
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("jax.jit called before config.json was written"))
    with pytest.raises(Stop):
        train_lib.train(cfg, str(workdir))
    with open(workdir / "config.json") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(to_dict(cfg)))
    assert written["model"]["num_layers"] == 2 and written["data"]["corpus"] == str(corpus)
    assert written["mesh"]["shape"] == [-1, 2, 1]  # as given; resolved against the devices at run time


# ---------------------------------------------------------------------------------------------
# Command line: one line on stderr, exit code 2, no traceback


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


CLI_CASES = [
    # (extra arguments for memtx.train, what the message must name)
    (["--config", "configs/txl.py:cpu", "--config.model.mem_len=-1"], "model.mem_len"),
    (["--config", "configs/txl.py:cpu", "--config.model.num_layrs=2"], "model.num_layers"),
    (["--config", "configs/txl.py:cpu", "--config.model.num_layers", "abc"], "model.num_layers"),
    (["--config", "configs/txl.py:cpu", "--config.data.batch_size=6"], "data.batch_size"),
    (["--config", "configs/txl.py:cpu", "--bogus"], "--bogus"),
    (["--config", "configs/nope.py"], "configs/nope.py"),
    (["--config", "configs/txl.py:nope"], "nope"),
    (["--config", "configs/txl.py:cpu", "--config.data.corpus=/nonexistent/path"], "/nonexistent/path"),
]


def assert_one_line_error(proc: subprocess.CompletedProcess, names: str) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert names in lines[0], lines[0]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.mark.parametrize("args, names", CLI_CASES, ids=[" ".join(a[1:]) for a, _ in CLI_CASES])
def test_train_cli_bad_config_is_one_line(tmp_path, args, names, capsys, monkeypatch):
    """In-process, through the command's own run_cli (the process boundary is tested once below)."""
    from memtx import train as train_lib
    from memtx.cli import run_cli
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "work"
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(workdir), *args])
    out = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], code, out.out, out.err), names)
    assert not workdir.exists()  # rejected before anything was written


def test_train_cli_bad_config_is_one_line_from_a_process(tmp_path):
    """`python -m memtx.train` itself: exit code 2, one line on stderr, nothing written."""
    workdir = tmp_path / "work"
    proc = run_module("memtx.train", "--workdir", str(workdir), "--config", "configs/txl.py:cpu",
                      "--config.model.num_layrs=2")
    assert_one_line_error(proc, "model.num_layers")
    assert not workdir.exists()


def test_evaluate_cli_missing_workdir_is_one_line():
    proc = run_module("memtx.evaluate", "--workdir", "/nonexistent/workdir")
    assert_one_line_error(proc, "/nonexistent/workdir")


def test_a_config_saved_before_memory_was_renamed_still_loads():
    """Work directories from before `model.memory_type` became `model.memory` resume as they were."""
    data = to_dict(Config())
    data["model"]["memory_type"] = data["model"].pop("memory")
    data["model"]["memory_type"] = "lamemo"
    assert from_dict(data).model.memory == "lamemo"


@pytest.mark.parametrize("preset", ["cpu", "cpu_mean", "wt103", "enwik8", "text8"])
def test_compressive_presets_are_the_txl_models_with_a_compressed_memory(preset):
    cfg = load_config_file(f"{ROOT / 'configs' / 'compressive.py'}:{preset}")
    base = txl(preset.removesuffix("_mean"))
    assert cfg.model.memory == "compressive" and cfg.model.compressive.size > 0
    assert validate(cfg, NUM_DEVICES) == validate(base, NUM_DEVICES)
    cfg.model.memory, cfg.name, cfg.model.compressive = "xl", base.name, type(cfg.model.compressive)()
    assert to_dict(cfg) == to_dict(base)  # everything else is the compared Transformer-XL's


def config_fields(section, prefix: str = ""):
    """(dotted key, type, dataclasses.Field) of every field, sections included, in every section."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        yield prefix + f.name, hints[f.name], f
        if dataclasses.is_dataclass(getattr(section, f.name)):
            yield from config_fields(getattr(section, f.name), f"{prefix}{f.name}.")


def declared_fields(cfg):
    """(key, type, Range or None) of every field that declares what it may hold (a float must be finite)."""
    return [(key, typ, f.metadata.get("range")) for key, typ, f in config_fields(cfg)
            if "range" in f.metadata or choices(typ) is not None or typ is float]


def preset_with(key: str, value):
    """txl:cpu with the field `key` (dotted) set to `value` directly, as a config file would."""
    cfg = txl("cpu")
    *path, name = key.split(".")
    section = cfg
    for part in path:
        section = getattr(section, part)
    setattr(section, name, value)
    return cfg


def violations(typ, bounds) -> list:
    """Values the declaration forbids: an unknown name, nan and inf for floats, each bound crossed."""
    out = ["no_such_choice"] if choices(typ) is not None else []
    if typ is float:
        out += [math.nan, math.inf, -math.inf]
    if bounds is not None:
        step = 1 if typ is int else 0.5
        out += [v for v in (None if bounds.ge is None else bounds.ge - step, bounds.gt,
                            bounds.lt, None if bounds.le is None else bounds.le + step) if v is not None]
        out = [typ(v) if typ is int else v for v in out]
    return out


def test_every_declared_field_refuses_each_value_its_declaration_forbids_in_one_line():
    """Generated from the declarations (memtx/config_schema.py): every field with a Literal, a
    range or a float type, in every section and every kind's options, given each value it forbids,
    is a one-line ConfigError naming it; the valid preset itself passes."""
    validate(txl("cpu"), NUM_DEVICES)
    cases = 0
    for key, typ, bounds in declared_fields(txl("cpu")):
        for bad in violations(typ, bounds):
            message = config_error(validate, preset_with(key, bad), NUM_DEVICES)
            assert f"'{key}'" in message, (key, bad, message)
            cases += 1
    assert cases > 100, cases


def wrong_types(typ) -> list:
    """Values of another type than a field's (as a config file may set): None always, a string for
    numbers and flags, a number for strings, a float for integers, a bare value for tuples."""
    if typ is bool:
        return [None, "yes", 1]
    if typ is int:
        return [None, "4", 2.5, True]
    if typ is float:
        return [None, "0.1", False]
    if typ is str or choices(typ) is not None:
        return [None, 3]
    if typing.get_origin(typ) is tuple:
        return [None, 3] + (["ab"] if typing.get_args(typ)[:1] == (int,) else [])
    return [None, 3]  # a section


def test_a_config_file_field_of_the_wrong_type_is_one_line_naming_it():
    """Overrides are parsed by type; a config file sets fields directly. Every field of every
    section (sections themselves included), given values of other types, is a one-line error
    naming the key, before anything else looks at the config."""
    cases = 0
    for key, typ, _ in config_fields(txl("cpu")):
        for bad in wrong_types(typ):
            message = config_error(validate, preset_with(key, bad), NUM_DEVICES)
            assert f"'{key}'" in message, (key, bad, message)
            cases += 1
    assert cases > 200, cases
