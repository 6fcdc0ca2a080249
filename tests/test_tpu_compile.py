"""Compiled for a TPU slice ahead of time, on this machine (libtpu from .venv/libtpu, see
requirements-tpu.txt): the kNN memory's search in the optimised TPU program is the approximate
top-k where it should be. On CPU and GPU `jax.lax.approx_max_k` is an exact sort, so only the TPU
compiler's output shows the approximation: it lowers to the `PartialReduce` custom call there.

The compiles run in one subprocess with XLA's optimisations on: the suite turns most of them off
(tests/conftest.py), and without them the TPU compiler makes approx_max_k an exact TopK.
Skipped (with the reason) when libtpu is not to be found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtx import fit

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("auto", "approx", "exact", "blocked", "bucketed")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not fit.find_libtpu(), reason="libtpu is not installed (bash scripts/setup_env.sh "
                                                               "puts it in .venv/libtpu): no TPU compiler here")]

COMPILE = r'''
import json, re, sys
from memtx import fit
from memtx.cli import resolve_config
out = {}
for backend in sys.argv[1:]:
    cfg = resolve_config("configs/knn.py:cpu", None, [f"--config.model.knn.backend={backend}"])
    hlo = fit.compile_steps(cfg, fit.tpu_topology_devices("v5e", 8))["train"].as_text()
    out[backend] = {"custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
                    "sorts": len(re.findall(r"\bsort\(", hlo))}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def lowered():
    """backend -> {"custom_calls", "sorts"} of the kNN preset's train step (8K slots, as
    configs/knn.py:cpu) compiled for a v5e slice of 8 chips."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "0", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", COMPILE, *BACKENDS], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stderr[-2000:]
    return json.loads(result[0][len("RESULT "):])


@pytest.mark.parametrize("backend", ["auto", "approx"])
def test_the_tpu_program_searches_approximately(lowered, backend):
    """`auto` means `approx` on a TPU slice even when compiled from a CPU machine (state.for_platform:
    at trace time JAX's default backend here is the CPU, whose choice is the exact search)."""
    assert "PartialReduce" in lowered[backend]["custom_calls"]


@pytest.mark.parametrize("backend", ["exact", "blocked", "bucketed"])
def test_the_other_backends_lower_without_the_approximate_top_k(lowered, backend):
    """exact: one top-k over every slot; blocked: a top-k per tile, then one over the candidates (more
    sorts than exact); bucketed: the maximum of each bucket, then a top-k of the winners."""
    assert "PartialReduce" not in lowered[backend]["custom_calls"]
    if backend == "blocked":
        assert lowered["blocked"]["sorts"] > lowered["exact"]["sorts"]
    if backend == "bucketed":
        assert lowered["bucketed"]["sorts"] <= lowered["exact"]["sorts"]


# Every preset of configs/, train and eval steps, compiled for a v5e and a v4 slice of 8 chips at
# reduced depth and width with the same structure (memtx/tpu_aot.py: memory kind, layer roles,
# segment, memory and kNN sizes, backends). About 15 s a preset and slice on 2 cores, 25 min in all:
# marked `tpu_presets`, left out of the suite and run as its own step by .ci/run
# (bash scripts/test.sh -m tpu_presets). The full shapes: benchmarks/tpu_estimate.py.

def _preset_names():
    from memtx import tpu_aot
    return tpu_aot.preset_names()


@pytest.mark.tpu_presets
@pytest.mark.parametrize("target", ["v5e-8", "v4-8"])
@pytest.mark.parametrize("name", _preset_names())
def test_every_preset_compiles_for_a_tpu_slice(name, target):
    from memtx import tpu_aot
    from memtx.config import load_config_file
    kind, chips = target.split("-")
    cfg = tpu_aot.for_slice(tpu_aot.reduced(load_config_file(name)), int(chips), batch=int(chips))
    steps = tpu_aot.compile_steps(cfg, kind, int(chips))
    for step in steps.values():
        analysis = tpu_aot.analysis(step, kind)
        assert analysis["flops"] > 0 and analysis["arguments"] > 0


def test_there_are_presets_to_compile():
    names = _preset_names()
    assert len(names) > 40 and any(":paper_262144" in n for n in names) and any("_no_look_ahead" in n for n in names)
