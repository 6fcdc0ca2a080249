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


def test_a_v4_chip_is_one_device_with_the_whole_chips_memory():
    """v4 (and v5p) chips have two TensorCores; JAX on a TPU VM runs each chip as one device
    (megacore) with its 32 GiB. A program of 20 GiB compiles for a v4 chip and is refused for a
    v5e chip (16 GiB): compiled for one core of each chip, as before, the v4 refused it too."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    def compile_20_gib(kind, chips):
        devices = fit.tpu_topology_devices(kind, chips)
        assert len(devices) == chips
        x = jax.ShapeDtypeStruct((10 * 2**28,), jnp.float32, sharding=SingleDeviceSharding(devices[0]))  # 10 GiB
        return jax.jit(lambda x: x + 1).lower(x).compile()  # and 10 GiB out

    assert compile_20_gib("v4", 4).memory_analysis().argument_size_in_bytes == 10 * 2**30
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        compile_20_gib("v5e", 8)


# Every preset of configs/ compiled for TPU slices at reduced depth and width with the same
# structure (memtx/tpu_aot.py: memory kind, layer roles, segment, memory and kNN sizes, backends):
# - every preset as it is, train and eval steps, for a v5e-8 (8 chips);
# - one preset of each memory kind (tpu_aot.VARIANT_PRESETS) as it is for a v4-8 (4 chips, two
#   TensorCores each), and with model.scan_layers, model.remat, and both (tpu_aot.VARIANTS) for the
#   v5e-8: the train step, and the eval step when scanned (remat changes only the backward pass).
# 65 cases, about 30 min on 2 cores: marked `tpu_presets`, left out of the suite and run as its
# own step by .ci/run (bash scripts/test.sh -m tpu_presets --dist load). MEMTX_TPU_CASES=all adds
# every other preset on the v4-8 and in every variant (about 2 hours). The full shapes:
# benchmarks/tpu_estimate.py.


def _preset_names():
    from memtx import tpu_aot
    return tpu_aot.preset_names()


def _cases():
    from memtx import tpu_aot
    every = _preset_names()
    some = every if os.environ.get("MEMTX_TPU_CASES", "") == "all" else list(tpu_aot.VARIANT_PRESETS)
    return ([(name, "v5e-8", "") for name in every] + [(name, "v4-8", "") for name in some]
            + [(name, "v5e-8", v) for name in some for v in tpu_aot.VARIANTS])


CASES = _cases()


@pytest.mark.tpu_presets
@pytest.mark.parametrize("name,target,variant", CASES, ids=[f"{n}-{t}{'-' + v if v else ''}" for n, t, v in CASES])
def test_every_preset_compiles_for_a_tpu_slice(name, target, variant):
    from memtx import tpu_aot
    from memtx.config import load_config_file
    kind, chips, _ = fit.parse_target(target)
    cfg = tpu_aot.for_slice(tpu_aot.variant(load_config_file(name), variant), chips, batch=chips)
    scanned = tpu_aot.scanned_runs(cfg)
    assert bool(scanned) == ("scan" in variant), scanned  # the variant scans a run of layers, or none
    steps = tpu_aot.compile_steps(cfg, kind, chips, ("train",) if "remat" in variant else ("train", "eval"))
    for step in steps.values():
        analysis = tpu_aot.analysis(step, kind)
        assert analysis["flops"] > 0 and analysis["arguments"] > 0
        if scanned:
            assert "while(" in step.as_text()  # the scan survived into the TPU program as a loop


def test_there_are_presets_to_compile():
    names = _preset_names()
    assert len(names) > 40 and any(":paper_262144" in n for n in names) and any("_no_look_ahead" in n for n in names)


def test_the_variants_cover_every_memory_kind_and_the_knn_memory():
    from memtx import tpu_aot
    from memtx.config import load_config_file
    from memtx.memory import registry
    configs = [load_config_file(name) for name in tpu_aot.VARIANT_PRESETS]
    assert set(tpu_aot.VARIANT_PRESETS) <= set(_preset_names())
    assert {c.model.memory for c in configs} == set(registry.KINDS)
    assert any(c.model.knn.enabled for c in configs) and any(c.model.mem_len == 0 and not c.model.knn.enabled
                                                             for c in configs)  # the kNN layer, and no memory


def test_a_variant_has_what_it_names():
    from memtx import tpu_aot
    from memtx.config import load_config_file
    cfg = load_config_file("configs/knn.py:paper_65536")
    plain, both = tpu_aot.variant(cfg, ""), tpu_aot.variant(cfg, "scan_remat")
    assert (plain.model.scan_layers, plain.model.remat, plain.model.num_layers) == (False, "", 3)
    assert both.model.scan_layers and both.model.remat == "nothing_saveable"
    # the kNN layer keeps its relative depth (8 of 0..11) and is not in the scanned run
    (knn_layer,) = both.model.knn.layers
    assert knn_layer == 4 and all(not a <= knn_layer < b for a, b in tpu_aot.scanned_runs(both))
    assert both.model.knn.size == cfg.model.knn.size and both.data.seq_len == cfg.data.seq_len
