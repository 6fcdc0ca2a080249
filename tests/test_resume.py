"""A run stopped at step S and resumed continues exactly: same per-step losses as one run.

The checkpoint holds parameters, optimizer state, step, the memory state of every row and the
data streams' positions; nothing else may influence the continuation.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memtx.config import save_json
from memtx.metrics import read_metrics
from memtx.train import train
from tests.helpers import make_corpus, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def test_stop_and_resume_gives_identical_losses(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    straight = tiny_config(corpus, steps=12)
    train(straight, str(tmp_path / "straight"))

    first = tiny_config(corpus, steps=12, stop_after=6)
    summary = train(first, str(tmp_path / "resumed"))
    assert summary["end_step"] == 6
    second = tiny_config(corpus, steps=12)
    summary = train(second, str(tmp_path / "resumed"))
    assert summary["start_step"] == 6 and summary["end_step"] == 12

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=0, atol=1e-6)
    # The losses move: resuming with fresh memory or a rewound data stream would show up.
    assert len({round(v, 6) for v in a.values()}) == 12


def stop_resume_and_compare(cfg, tmp_path, stop: int) -> dict[int, float]:
    """Trains `cfg()` straight through, and again stopped after `stop` steps then resumed; asserts
    identical per-step losses and returns them."""
    steps = cfg().train.steps
    train(cfg(), str(tmp_path / "straight"))
    assert train(cfg(stop_after=stop), str(tmp_path / "resumed"))["end_step"] == stop
    assert train(cfg(), str(tmp_path / "resumed"))["start_step"] == stop
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-6)
    return a


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


@pytest.mark.parametrize("kill_at", [14, 12])
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, kill_at):
    """SIGKILL in the middle of training (async saves in flight), then rerun the same command.
    At step 12 the kill lands as step 12's checkpoint is being written (the progress line is
    printed just before the save starts): the half-written step must be ignored or completed."""
    corpus = str(make_corpus(tmp_path / "corpus"))
    cfg = tiny_config(corpus, steps=30, checkpoint_every=4)
    config_file = tmp_path / "config.json"
    save_json(cfg, str(config_file))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def command(workdir):  # resume from the saved config.json in the work directory
        return [sys.executable, "-m", "memtx.train", "--workdir", str(workdir)]

    for workdir in ("straight", "killed"):
        (tmp_path / workdir).mkdir()
        (tmp_path / workdir / "config.json").write_text(config_file.read_text())
    subprocess.run(command(tmp_path / "straight"), env=env, cwd=ROOT, check=True, capture_output=True)

    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(f"step {kill_at}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run should have been killed mid-way"
    out = subprocess.run(command(tmp_path / "killed"), env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    assert "resumed from step" in out.stdout

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 31))
    np.testing.assert_allclose([b[s] for s in range(1, 31)], [a[s] for s in range(1, 31)], rtol=0, atol=1e-6)
