"""One command-line convention: configs by name from any directory, --print-config, and unknown
names or presets answered with the valid ones, in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_config_by_name_from_another_directory_and_print_config(tmp_path):
    out = run("memtx.train", "--config", "knn:cpu", "--workdir", str(tmp_path / "run"), "--print-config",
              "--config.model.mem_len=32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    cfg = json.loads(out.stdout)
    assert cfg["name"] == "knn_cpu" and cfg["model"]["mem_len"] == 32 and cfg["model"]["knn"]["enabled"]
    assert not (tmp_path / "run").exists()  # printing trains nothing
    gen = run("memtx.generate", "--config", "lamemo:cpu", "--workdir", str(tmp_path), "--print-config", cwd=tmp_path)
    assert gen.returncode == 0 and json.loads(gen.stdout)["model"]["memory"] == "lamemo"


@pytest.mark.slow
def test_unknown_names_and_presets_list_the_valid_ones(tmp_path):
    out = run("memtx.train", "--config", "txl:nope", "--workdir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no preset 'nope'" in out.stderr and "cpu_rpe" in out.stderr and "enwik8" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = run("memtx.train", "--config", "txll", "--workdir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "no config named 'txll'" in out.stderr and "lamemo" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_configs_resolve_from_an_installed_wheel(tmp_path):
    """The config files are package data: installed from a wheel (not this clone), `txl:cpu`
    resolves to the copy inside the installed package, from any working directory."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in the environment")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-1500:]
    wheel, = (tmp_path / "wheel").glob("memtx-*.whl")
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-1500:]
    code = ("import memtx.config as c; print(c.__file__); print(c.find_config_file('txl')); "
            "print(c.load_config_file('knn:cpu').name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    module_file, config_file, name = out.stdout.split()
    assert module_file.startswith(str(site)) and config_file.startswith(str(site / "memtx" / "configs"))
    assert name == "knn_cpu"
