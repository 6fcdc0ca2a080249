"""The fit estimate against XLA's own memory analysis of the compiled train step (8 CPU devices)."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest

from memtx import fit
from memtx.cli import UsageError
from memtx.config import ConfigError
from memtx.memory import registry
from tests.helpers import kind_options, tiny_config


def configs():
    """The tiny config with every registered memory kind, and with the kNN memory."""
    out = {}
    for name in registry.KINDS:
        cfg = tiny_config(mesh_shape=(2, 2, 2))  # the estimate divides by the mesh
        cfg.model = dataclasses.replace(cfg.model, memory=name, **kind_options(name))
        out[name] = cfg
    knn = out["knn"] = tiny_config(mesh_shape=(2, 2, 2))
    knn.model.knn.enabled, knn.model.knn.layers, knn.model.knn.size, knn.model.knn.k = True, (1,), 256, 4
    return out


@pytest.mark.parametrize("name", list(configs()))
@pytest.mark.slow
def test_estimate_matches_the_compiled_step(name):
    cfg = configs()[name]
    estimate = fit.estimate(cfg, jax.device_count())
    xla = fit.compiled_memory(cfg)
    parts = estimate["parts"]
    exact = parts["parameters"] + parts["optimizer state"] + parts["memories"]
    data_parallel = estimate["mesh"]["data"] * estimate["mesh"]["fsdp"]
    rows = cfg.data.batch_size // data_parallel
    batch = rows * cfg.data.seq_len * (4 + 4 + 4 + 4) + rows  # inputs, targets, weights, loss_weights; reset flags
    # Parameters, optimizer state and memories are exact: XLA's arguments are those plus the batch.
    assert xla["arguments"] - batch - 64 <= exact <= xla["arguments"] - batch + 64, (exact, batch, xla)
    # The activation estimate is an estimate: within a factor of 3 of XLA's temporaries.
    ratio = parts[fit.ACTIVATIONS] / xla["temporaries"]
    assert 1 / 3 <= ratio <= 3, (ratio, parts, xla)


@pytest.mark.parametrize("name", ["knn", "lamemo"])
def test_a_run_is_planned_once(name):
    """Training's check uses the run's own Setup (no second build): the same estimate as one
    built afresh on an abstract mesh; a Setup derives each batch size's abstract memory once."""
    from memtx import state as state_lib

    cfg = configs()[name]
    setup = state_lib.build(cfg)
    assert fit.estimate(cfg, jax.device_count(), setup) == fit.estimate(cfg, jax.device_count())
    memory = state_lib.abstract_memory(setup, cfg.data.batch_size)
    assert state_lib.abstract_memory(setup, cfg.data.batch_size) is memory
    assert jax.tree.map(lambda a: a.sharding, memory) == state_lib.memory_shardings(setup)


def test_knn_store_bytes_follow_the_formula():
    cfg = configs()["knn"]
    cfg.model.mem_len = 0  # only the kNN store
    cfg.mesh.shape = (-1, 1, 2)  # heads split over the model axis
    for devices in (8, 16, 64):
        cfg.data.batch_size = cfg.data.eval_batch_size = 64
        estimate = fit.estimate(cfg, devices)
        m = cfg.model
        rows = cfg.data.batch_size // math.prod(estimate["mesh"][a] for a in ("data", "fsdp"))
        heads = m.num_heads // estimate["mesh"]["model"]
        store = rows * heads * m.knn.size * m.dim_per_head * 2 * 4  # keys and values, float32
        assert store <= estimate["parts"]["memories"] <= store + rows * m.num_heads * 64, devices


def test_targets():
    assert fit.parse_target("v4-32")[:2] == ("v4", 16)  # 32 TensorCores, 16 chips
    assert fit.parse_target("v5e-16")[:2] == ("v5e", 16)
    assert fit.parse_target("h100x8") == ("h100", 8, 80 * 2**30)
    with pytest.raises(UsageError, match="unknown --target"):
        fit.parse_target("tpu-big")
    with pytest.raises(ConfigError, match="data-parallel"):
        fit.estimate(tiny_config(mesh_shape=(-1, 1, 1)), 64)  # batch 4 over 64 data-parallel devices


def test_cli_says_whether_it_fits(capsys):
    from memtx.cli import run_cli

    code = run_cli(fit.main, fit.parser(), ["--config", "configs/lamemo.py:enwik8", "--target", "h100x8"])
    out = capsys.readouterr().out
    assert code == 0 and "fits" in out and "| parameters |" in out
    code = run_cli(fit.main, fit.parser(), ["--config", "configs/knn.py:paper_262144", "--target", "v5e-16",
                                            "--config.data.batch_size=64", "--config.data.eval_batch_size=16"])
    assert code == 1 and "does NOT fit" in capsys.readouterr().out


def _has_libtpu() -> bool:
    return fit.find_libtpu()  # installed, or in .venv/libtpu (scripts/setup_env.sh)


def _fit_aot(capsys):
    from memtx.cli import run_cli
    code = run_cli(fit.main, fit.parser(), ["--config", "configs/txl.py:cpu", "--target", "v5e-8", "--aot"])
    return code, capsys.readouterr()


def test_aot_without_libtpu_is_one_line(capsys, monkeypatch):
    """Without a libtpu that can describe the slice (here: its topology call fails as it does with
    none installed), one line saying how to install it."""
    from jax.experimental import topologies

    def no_libtpu(*args, **kwargs):
        raise RuntimeError("Unknown backend tpu")
    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    code, captured = _fit_aot(capsys)
    assert code == 2 and "jax[tpu]" in captured.err and captured.err.count("\n") == 1


@pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (bash scripts/setup_env.sh puts it in "
                                               ".venv/libtpu): cannot compile for a TPU slice here")
def test_aot_for_a_tpu_slice(capsys):
    """With libtpu the step compiles ahead of time for a TPU slice (a skip, not a pass, without it)."""
    code, captured = _fit_aot(capsys)
    assert code == 0 and "compiled for v5e-8" in captured.out and "fits (XLA)" in captured.out
