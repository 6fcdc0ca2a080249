"""benchmarks/accelerator_suite.sh, the one prepared run for a lent GPU or TPU host, run through
here at the CPU presets' size (SMOKE=1): a device session has minutes, and a script that stops
on its third command would spend them. Every part must write its table. Marked
`accelerator_suite`: left out of the suite, run by .ci/run's second step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("knn_step_time.md", "lamemo_vs_xl.md", "txl_wt103_mfu.md", "compile_time.md", "remat_memory.md")

pytestmark = [pytest.mark.slow, pytest.mark.accelerator_suite]


def _run(out: Path, part: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOKE": "1", "PART": part, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, as a one-GPU host has one
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator_suite.sh"), str(out)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=1200)


def _rows(text: str) -> list[str]:
    """A markdown table's rows, header and rule left out."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [line for line in lines[1:] if not set(line) <= set("|-: ")]


def test_every_speed_part_writes_its_table(tmp_path):
    done = _run(tmp_path, "speed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CpuDevice" in (tmp_path / "devices.txt").read_text()
    for table in TABLES:
        assert _rows((tmp_path / table).read_text()), f"{table} has no rows:\n{(tmp_path / table).read_text()}"
    remat = (tmp_path / "remat_memory.md").read_text()
    assert remat.count("| (none) |") == 2 and "| nothing_saveable |" in remat  # both presets, each policy


def test_the_memory_payoff_part_compares_both_models(tmp_path):
    done = _run(tmp_path, "pays_off")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "pays_off_onset.md").read_text()
    assert "xl" in text and "knn" in text and _rows(text)
