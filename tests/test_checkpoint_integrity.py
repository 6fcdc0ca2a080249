"""Damaged checkpoints: the integrity record catches garbled and truncated files that orbax would
load silently; a damaged latest step is reported in one line and the one before is used, by
training (which then continues exactly) and by evaluation; with nothing restorable, one line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from memtx import evaluate as evaluate_lib
from memtx import train as train_lib
from memtx.checkpoint import INTEGRITY_FILE, Checkpointer
from memtx.cli import run_cli
from tests.helpers import make_corpus, tiny_config, tmpfs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run twice: 6 steps straight (the reference), and stopped at step 6 of 9."""
    tmp = tmp_path_factory.mktemp("integrity")
    corpus = str(make_corpus(tmp / "corpus", num_docs=3))
    full = tmp / "full"
    train_lib.train(tiny_config(corpus, steps=9, checkpoint_every=3, keep_checkpoints=3), str(full))
    partial = tmp / "partial"
    train_lib.train(tiny_config(corpus, steps=9, checkpoint_every=3, keep_checkpoints=3, stop_after=6), str(partial))
    return tmp, full, partial


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def biggest_file(step_dir: Path, item: str) -> Path:
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_every_finished_save_has_an_integrity_record(runs):
    _, full, _ = runs
    ckpt = Checkpointer(str(full / "checkpoints"), async_save=False)
    assert ckpt.all_steps() == [3, 6, 9]
    for step in (3, 6, 9):
        record = json.loads((full / "checkpoints" / str(step) / INTEGRITY_FILE).read_text())
        assert record["step"] == step and any(name.startswith("params/") for name in record["files"])
        assert ckpt.verify(step) is None
    ckpt.close()


@pytest.mark.parametrize("damage, item", [(garble, "params"), (garble, "train"), (truncate, "params"),
                                          (garble, "memory")])
def test_a_damaged_latest_step_is_reported_and_the_previous_one_resumes_exactly(runs, tmp_path, capsys, damage, item):
    _, full, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    damage(biggest_file(run / "checkpoints" / "6", item))
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "checkpoint step 6" in err and "is damaged" in err and "moved the damaged step 6" in err
    assert (run / "checkpoints" / "6.damaged").is_dir()
    # Resumed from step 3 with step 3's memory and stream: steps 4..9 as in the straight run.
    assert losses(run) == pytest.approx(losses(full), abs=1e-6)


def test_evaluation_skips_a_damaged_latest_step(runs, tmp_path, capsys):
    _, _, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    garble(biggest_file(run / "checkpoints" / "6", "params"))
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(run), "--split", "train",
                                                              "--config.data.eval_max_docs=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "checkpoint step 6" in captured.err and "does not match its checksum" in captured.err
    assert "evaluating step 3" in captured.out
    assert (run / "checkpoints" / "6").is_dir()  # evaluation moves nothing


def test_damage_without_a_record_falls_back_when_the_step_cannot_be_read(runs, tmp_path, capsys):
    """A step killed before its record was written, then damaged: orbax's own failure to read it
    is the signal."""
    _, full, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    step6 = run / "checkpoints" / "6"
    (step6 / INTEGRITY_FILE).unlink()
    shutil.rmtree(step6 / "data")
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "cannot be read" in err and (run / "checkpoints" / "6.damaged").is_dir()
    assert losses(run) == pytest.approx(losses(full), abs=1e-6)


def _one_error(code, err) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_damaged_step_named_with_step_is_refused_by_every_reader(runs, tmp_path, capsys):
    """--step N on a step whose files do not match their record: one line naming the damage, from
    evaluation, generation and a study, instead of results computed from it."""
    from memtx import generate as generate_lib
    from memtx.studies import extrapolation

    _, _, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    garble(biggest_file(run / "checkpoints" / "6", "params"))
    for module, argv in ((evaluate_lib, ["--workdir", str(run), "--split", "train", "--step", "6"]),
                         (generate_lib, ["--workdir", str(run), "--prompt", "x", "--step", "6"]),
                         (extrapolation, ["--workdir", str(run), "--step", "6", "--out", str(tmp_path / "x")])):
        line = _one_error(run_cli(module.main, module.parser(), argv), capsys.readouterr().err)
        assert "checkpoint step 6" in line and "is damaged" in line and "checksum" in line, line
    assert not list(run.glob("eval_*.json")) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("record", [{"files": [1, 2]}, {"files": {"a": "b"}}, {"files": {"a": [1]}}, ["files"], 7])
def test_an_integrity_record_of_the_wrong_shape_is_damage_not_a_traceback(runs, tmp_path, record):
    _, _, partial = runs
    step3 = tmp_path / "3"
    shutil.copytree(partial / "checkpoints" / "3", step3)
    (step3 / INTEGRITY_FILE).write_text(json.dumps(record))
    from memtx.checkpoint_integrity import verify
    assert INTEGRITY_FILE in verify(str(step3))


def test_a_step_without_a_record_must_hold_finite_parameters(runs, tmp_path, capsys):
    """A step with no record cannot be compared with what was written: one whose parameters hold
    a nan is refused in one line when named; the newest good step is still found without --step."""
    import jax
    import jax.numpy as jnp

    from memtx import state as state_lib
    from memtx.config import load_json

    _, _, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    cfg = load_json(str(run / "config.json"))
    setup = state_lib.build(cfg)
    ckpt = Checkpointer(str(run / "checkpoints"), keep=5, async_save=False)
    state, memory, data = ckpt.restore(6, setup.abstract_state, state_lib.abstract_memory(setup, cfg.data.batch_size))
    leaves, tree = jax.tree.flatten(state["params"])
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    ckpt.save(7, {**state, "params": jax.tree.unflatten(tree, leaves)}, memory, data)
    ckpt.close()
    (run / "checkpoints" / "7" / INTEGRITY_FILE).unlink()  # as if killed before its record
    line = _one_error(run_cli(evaluate_lib.main, evaluate_lib.parser(),
                              ["--workdir", str(run), "--split", "train", "--step", "7"]), capsys.readouterr().err)
    assert "step 7" in line and "no integrity record" in line and "not finite" in line


def test_nothing_restorable_is_one_line_and_moves_nothing(runs, tmp_path, capsys):
    _, _, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    for step in (3, 6):
        truncate(biggest_file(run / "checkpoints" / str(step), "params"))
    before = sorted(os.listdir(run / "checkpoints"))
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "no checkpoint" in errors[0] and "can be restored" in errors[0]
    assert sorted(os.listdir(run / "checkpoints")) == before


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(tmp_path):
    """Training on a 2 MiB tmpfs until a save no longer fits: one error line naming the step, the
    directory and the reason; the run, moved to a roomier disk, resumes from its last complete
    checkpoint with the losses of an uninterrupted run."""
    import subprocess
    import sys

    from memtx.config import save_json

    with tmpfs(tmp_path / "small", "size=2M") as small:
        corpus = str(make_corpus(tmp_path / "corpus", num_docs=3))
        cfg = tiny_config(corpus, mesh_shape=(1, 1, 1), steps=60, checkpoint_every=3, keep_checkpoints=50)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        for name in ("full", "straight"):
            (small if name == "full" else tmp_path / name).mkdir(exist_ok=True)
        run_full, run_straight = small / "run", tmp_path / "straight"
        run_full.mkdir()
        save_json(cfg, str(run_full / "config.json"))
        save_json(cfg, str(run_straight / "config.json"))
        command = lambda run: [sys.executable, "-m", "memtx.train", "--workdir", str(run)]  # noqa: E731
        out = subprocess.run(command(run_full), env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, out.stderr[-2000:]
        assert errors[0].startswith("error: could not write checkpoint step")
        assert "No space left on device" in errors[0] and "the last complete checkpoint is step" in errors[0]
        # Nothing of orbax's own error logs, nor tensorstore's "Event loop is closed" from its write
        # threads (one traceback per array still being written when the save failed).
        assert "Traceback" not in out.stderr and "ERROR:absl" not in out.stderr and "memtx/" not in out.stderr
        raised = [line for line in lines if re.search(r"\w+(Error|Exception)\b", line) and not line.startswith("error:")]
        assert not raised, raised
        moved = tmp_path / "moved"
        shutil.copytree(run_full, moved)
    resumed = subprocess.run(command(moved), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stdout, resumed.stderr[-2000:]
    subprocess.run(command(run_straight), env=env, capture_output=True, text=True, timeout=600, check=True)
    assert sorted(losses(moved)) == list(range(1, 61))
    assert losses(moved) == pytest.approx(losses(run_straight), abs=1e-6)


@pytest.mark.parametrize("damage", ["delete_data_item", "truncate_data_json", "empty_step_dir"])
def test_missing_items_and_empty_steps_fall_back(runs, tmp_path, capsys, damage):
    _, full, partial = runs
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    step6 = run / "checkpoints" / "6"
    if damage == "delete_data_item":
        shutil.rmtree(step6 / "data")
    elif damage == "truncate_data_json":
        truncate(biggest_file(step6, "data"))
    else:
        shutil.rmtree(step6)
        step6.mkdir()
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "checkpoint step 6" in err and "is damaged" in err
    assert losses(run) == pytest.approx(losses(full), abs=1e-6)


@pytest.mark.slow
def test_another_models_checkpoint_is_one_line(runs, tmp_path, capsys):
    """Checkpoints copied in from a model of another width: training and evaluation say so in
    one line (nothing is set aside: the files are intact)."""
    tmp, _, partial = runs
    other = tmp_path / "other"
    cfg = tiny_config(str(tmp / "corpus"), steps=3, checkpoint_every=3)
    cfg.model.d_model, cfg.model.d_ff = 48, 96
    train_lib.train(cfg, str(other))
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(other / "checkpoints", run / "checkpoints")
    for module, argv in ((train_lib, ["--workdir", str(run)]),
                         (evaluate_lib, ["--workdir", str(run), "--split", "train"])):
        code = run_cli(module.main, module.parser(), argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert "step 3" in errors[0] and "another model" in errors[0] and "there, " in errors[0]
    assert (run / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_orbax_log_filters_are_installed_by_the_checkpointer_not_by_importing(tmp_path):
    """Importing memtx.checkpoint changes no logging or exception hook; the first Checkpointer
    installs the filters once (a second one adds none)."""
    import subprocess
    import sys

    code = f"""
import logging, sys
hook = sys.unraisablehook
import memtx.checkpoint
assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters
assert sys.unraisablehook is hook
memtx.checkpoint.Checkpointer({str(tmp_path / 'a')!r}, async_save=False)
memtx.checkpoint.Checkpointer({str(tmp_path / 'b')!r}, async_save=False)
assert len(logging.getLogger("absl").filters) == 1 and len(logging.getLogger("asyncio").filters) == 1
assert sys.unraisablehook is not hook
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
