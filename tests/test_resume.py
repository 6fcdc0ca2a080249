"""A run stopped at step S and resumed continues exactly: same per-step losses as one run.

The checkpoint holds parameters, optimizer state, step, the memory state of every row and the
data streams' positions; nothing else may influence the continuation. A run ends early in three
ways, each tested: `train.stop_after`, SIGKILL (nothing saved beyond the last checkpoint) and
SIGTERM (a preempted VM: the step reached is saved, the exit is 0).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memtx import checkpoint as checkpoint_lib
from memtx import train as train_lib
from memtx.checkpoint import INTEGRITY_FILE
from memtx.config import load_json, save_json
from memtx.workdir_files import read_metrics
from memtx.train import train
from tests.helpers import make_corpus, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30  # the subprocess runs: 30 steps, a checkpoint every 4
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def assert_same_losses(run, reference, steps: int = STEPS) -> None:
    a, b = losses(reference), losses(run)
    assert sorted(b) == list(range(1, steps + 1))
    np.testing.assert_allclose([b[s] for s in range(1, steps + 1)], [a[s] for s in range(1, steps + 1)],
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_stop_and_resume_gives_identical_losses(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    straight = tiny_config(corpus, mesh_shape=(2, 2, 2), steps=12)
    train(straight, str(tmp_path / "straight"))

    first = tiny_config(corpus, mesh_shape=(2, 2, 2), steps=12, stop_after=6)
    summary = train(first, str(tmp_path / "resumed"))
    assert summary["end_step"] == 6
    second = tiny_config(corpus, mesh_shape=(2, 2, 2), steps=12)
    summary = train(second, str(tmp_path / "resumed"))
    assert summary["start_step"] == 6 and summary["end_step"] == 12

    assert_same_losses(tmp_path / "resumed", tmp_path / "straight", steps=12)
    # The losses move: resuming with fresh memory or a rewound data stream would show up.
    assert len({round(v, 6) for v in losses(tmp_path / "straight").values()}) == 12


def stop_resume_and_compare(cfg, tmp_path, stop: int) -> dict[int, float]:
    """Trains `cfg()` straight through, and again stopped after `stop` steps then resumed; asserts
    identical per-step losses and returns them."""
    steps = cfg().train.steps
    train(cfg(), str(tmp_path / "straight"))
    assert train(cfg(stop_after=stop), str(tmp_path / "resumed"))["end_step"] == stop
    assert train(cfg(), str(tmp_path / "resumed"))["start_step"] == stop
    assert_same_losses(tmp_path / "resumed", tmp_path / "straight", steps=steps)
    return losses(tmp_path / "straight")


@pytest.mark.slow
def test_resume_without_an_xl_cache(tmp_path):
    """mem_len 0 (Transformer+RPE, or a kNN model without an XL cache) leaves zero-size memory
    leaves, which orbax cannot write: the checkpoint must still save and resume exactly."""
    corpus = str(make_corpus(tmp_path / "corpus"))

    def cfg(**train):
        c = tiny_config(corpus, steps=8, **train)
        c.model.mem_len = 0
        c.model.knn.enabled, c.model.knn.layers, c.model.knn.size, c.model.knn.k = True, (1,), 32, 4
        return c

    stop_resume_and_compare(cfg, tmp_path, stop=3)


# ---------------------------------------------------------------------------------------------
# Killed and preempted runs: `python -m memtx.train` in a subprocess, as a TPU VM runs it, against
# one uninterrupted run of the same config (trained once for the module).


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(config file, work directory of the uninterrupted 30-step run)."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(str(make_corpus(tmp / "corpus")), mesh_shape=(2, 2, 2), steps=STEPS, checkpoint_every=4)
    config_file = tmp / "config.json"
    save_json(cfg, str(config_file))
    run = new_workdir(config_file, tmp / "straight")
    subprocess.run(command(run), env=ENV, cwd=ROOT, check=True, capture_output=True)
    return config_file, run


def new_workdir(config_file: Path, workdir: Path) -> Path:
    workdir.mkdir()
    (workdir / "config.json").write_text(config_file.read_text())
    return workdir


def command(workdir):  # resume from the saved config.json in the work directory
    return [sys.executable, "-m", "memtx.train", "--workdir", str(workdir)]


def run_until(workdir: Path, marker: str, sig: int) -> tuple[subprocess.Popen, str]:
    """Starts the training and sends `sig` once it has printed a line starting with `marker` (no
    sleep: the marker is printed inside the training loop, so the run is past its start-up and
    the SIGTERM handler is in place); returns the process, finished, and all it printed."""
    proc = subprocess.Popen(command(workdir), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker) and sig is not None:
            proc.send_signal(sig)
            sig = None  # once
    proc.wait(timeout=300)
    return proc, "".join(lines)


@pytest.mark.parametrize("kill_at", [14, 12])
@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(straight, tmp_path, kill_at):
    """SIGKILL in the middle of training (async saves in flight), then rerun the same command.
    At step 12 the kill lands as step 12's checkpoint is being written (the progress line is
    printed just before the save starts): the half-written step must be ignored or completed."""
    config_file, reference = straight
    run = new_workdir(config_file, tmp_path / "killed")
    proc, out = run_until(run, f"step {kill_at}/", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run should have been killed mid-way\n" + out
    rerun = subprocess.run(command(run), env=ENV, cwd=ROOT, check=True, capture_output=True, text=True)
    assert "resumed from step" in rerun.stdout
    assert_same_losses(run, reference)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_is_at_and_the_rerun_continues(straight, tmp_path):
    """A preempted VM gets SIGTERM: the run saves the step it has reached (not a multiple of
    checkpoint_every unless by chance), waits for the save, says so, exits 0, and the same command
    continues from there with the losses of the uninterrupted run."""
    config_file, reference = straight
    run = new_workdir(config_file, tmp_path / "preempted")
    proc, out = run_until(run, "step 3/", signal.SIGTERM)
    assert proc.returncode == 0, out
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved step")]
    assert len(saved) == 1, out
    step = int(saved[0].split()[3].rstrip(";"))
    assert 3 <= step < STEPS, out
    assert (run / "checkpoints" / str(step) / INTEGRITY_FILE).is_file(), out  # finished, not in flight
    assert sorted(losses(run)) == list(range(1, step + 1))
    rerun = subprocess.run(command(run), env=ENV, cwd=ROOT, check=True, capture_output=True, text=True)
    assert f"resumed from step {step}" in rerun.stdout
    assert_same_losses(run, reference)


@pytest.mark.slow
def test_sigterm_late_in_a_step_saves_the_next_step_it_announces(straight, tmp_path, monkeypatch, capsys):
    """The race that made the first SIGTERM test flaky, made deterministic: the signal arrives
    while step 5 is being reported, after the loop decided not to save step 5. The run must save
    the step it announces (here 6, the next one), not announce 5 with nothing saved."""
    config_file, reference = straight
    run = new_workdir(config_file, tmp_path / "late")
    report = train_lib.StepLog.report

    def report_then_sigterm(self, step, extra):
        report(self, step, extra)
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the training loop's Preemption

    monkeypatch.setattr(train_lib.StepLog, "report", report_then_sigterm)
    summary = train(load_json(str(config_file)), str(run))
    out = capsys.readouterr().out
    assert "SIGTERM: saved step 6;" in out and summary["end_step"] == 6, out
    assert (run / "checkpoints" / "6" / INTEGRITY_FILE).is_file()
    monkeypatch.setattr(train_lib.StepLog, "report", report)
    assert train(load_json(str(config_file)), str(run))["start_step"] == 6
    assert_same_losses(run, reference)


@pytest.mark.slow
def test_sigterm_while_the_last_checkpoint_is_written_does_not_cut_it_short(straight, tmp_path, monkeypatch):
    """SIGTERM during the final wait for the asynchronous save: the handler is still in place (the
    default action would kill the process with the save half-written), the run ends normally and
    its last checkpoint is complete."""
    config_file, _ = straight
    cfg = load_json(str(config_file))
    cfg.train.steps = 4
    reached_default = []
    previous = signal.signal(signal.SIGTERM, lambda *_: reached_default.append(True))  # stands in for the default
    wait = checkpoint_lib.Checkpointer.wait

    def wait_after_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        wait(self)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "wait", wait_after_sigterm)
    try:
        summary = train(cfg, str(tmp_path / "run"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not reached_default, "SIGTERM reached the handler outside training while the last save was in flight"
    assert summary["end_step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "4" / INTEGRITY_FILE).is_file()
