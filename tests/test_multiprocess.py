"""The multi-process path, proven on this machine: 2 processes with 4 CPU devices each, joined
through jax.distributed on 127.0.0.1 (gloo CPU collectives), train exactly like one process with
8 devices; a checkpoint written by 2 processes resumes in 1; bad launches are one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memtx.config import save_json
from memtx.workdir_files import read_metrics
from tests.helpers import make_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for any one group of processes; each is killed after it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, processes: int, devices_per_process: int, extra_env: list[dict] | None = None,
           args: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """Runs `python -m memtx.train --workdir W` as `processes` processes; returns their results."""
    port = free_port()
    procs = []
    for i in range(processes):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
        for key in ("MEMTX_NUM_PROCESSES", "MEMTX_PROCESS_ID", "MEMTX_COORDINATOR"):
            env.pop(key, None)
        if processes > 1:
            env.update(MEMTX_NUM_PROCESSES=str(processes), MEMTX_PROCESS_ID=str(i),
                       MEMTX_COORDINATOR=f"127.0.0.1:{port}", MEMTX_INIT_TIMEOUT="60")
        env.update((extra_env or [{}] * processes)[i])
        procs.append(subprocess.Popen([sys.executable, "-m", "memtx.train", "--workdir", str(workdir), *args],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return str(make_corpus(tmp_path_factory.mktemp("mp") / "corpus", num_docs=6))


def write_config(workdir: Path, corpus: str, **train) -> None:
    cfg = tiny_config(corpus, mesh_shape=(2, 2, 2), **{"steps": 6, "checkpoint_every": 3, **train})
    cfg.data.shards = 2  # the document shards do not depend on the process count
    cfg.model.knn.enabled, cfg.model.knn.layers, cfg.model.knn.size, cfg.model.knn.k = True, (1,), 32, 4
    workdir.mkdir(parents=True)
    save_json(cfg, str(workdir / "config.json"))


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(corpus, tmp_path):
    write_config(tmp_path / "one", corpus)
    write_config(tmp_path / "two", corpus, stop_after=3)
    (single,) = launch(tmp_path / "one", processes=1, devices_per_process=8)
    assert single.returncode == 0, single.stderr[-3000:]
    pair = launch(tmp_path / "two", processes=2, devices_per_process=4)
    for r in pair:
        assert r.returncode == 0, r.stderr[-3000:]
    # Process 0 alone prints progress and writes metrics.
    assert "step 3/6" in pair[0].stdout and "step" not in pair[1].stdout and "model:" not in pair[1].stdout
    assert "2 shard(s) over 2 process(es)" in pair[0].stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=0, atol=1e-5)
    # The checkpoint of the 2-process run (both processes' stream positions) resumes in one process.
    (resumed,) = launch(tmp_path / "two", processes=1, devices_per_process=8, args=("--config.train.stop_after=0",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    b = losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=0, atol=1e-5)
    assert len({round(v, 5) for v in a.values()}) == 6  # the losses move: a mix-up would show


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_coordinator_and_bad_process_id(corpus, tmp_path):
    write_config(tmp_path / "run", corpus)
    (r,) = launch(tmp_path / "run", 1, 4, [{"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "0"}])
    one_line_error(r, "MEMTX_COORDINATOR")
    (r,) = launch(tmp_path / "run", 1, 4, [{"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "2",
                                            "MEMTX_COORDINATOR": "127.0.0.1:1"}])
    one_line_error(r, "MEMTX_PROCESS_ID must be in 0..1")


def test_mismatched_process_counts_fail_in_one_line(corpus, tmp_path):
    write_config(tmp_path / "run", corpus)
    results = launch(tmp_path / "run", 2, 4, [{"MEMTX_INIT_TIMEOUT": "15"},
                                              {"MEMTX_NUM_PROCESSES": "3", "MEMTX_INIT_TIMEOUT": "15"}])
    for r in results:
        one_line_error(r, "MEMTX_NUM_PROCESSES")


def test_a_mesh_that_does_not_match_the_global_devices_fails_before_compiling(corpus, tmp_path):
    write_config(tmp_path / "run", corpus)
    results = launch(tmp_path / "run", 2, 4, args=("--config.mesh.shape=4,4,1",))
    for r in results:
        one_line_error(r, "mesh", "8")
        assert "first step" not in r.stdout


@pytest.mark.slow
def test_a_process_that_never_starts_or_a_duplicate_id_fail_in_one_line(corpus, tmp_path):
    """The roll call before JAX's runtime: process 1 of 2 never started (process 0 alone), and
    process 1 started twice (process 1 missing its own id's twin: every process says so)."""
    write_config(tmp_path / "run", corpus)
    port = free_port()
    common = {"MEMTX_NUM_PROCESSES": "2", "MEMTX_COORDINATOR": f"127.0.0.1:{port}", "MEMTX_INIT_TIMEOUT": "3"}
    (alone,) = launch(tmp_path / "run", 1, 4, [{**common, "MEMTX_PROCESS_ID": "0"}])
    one_line_error(alone, "process(es) 1 of 2 did not start within 3s")
    three = launch(tmp_path / "run", 3, 4, [{"MEMTX_NUM_PROCESSES": "3", "MEMTX_PROCESS_ID": str(i),
                                             "MEMTX_INIT_TIMEOUT": "20"} for i in (0, 1, 1)])
    for r in three:
        one_line_error(r, "MEMTX_PROCESS_ID=1")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
