"""Train-step time and tokens/s of a config with memory M = 0 and M = segment length.

    python benchmarks/step_time.py [--config configs/txl.py:cpu] [--steps 20] [--config.KEY=VALUE ...]

Prints compile time and the median over `--steps` steps (after compilation and 2 warm-up steps), for both memory
lengths, in one run. Synthetic byte tokens: this measures the model, not the data pipeline.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memtx import sharding, state as state_lib
from memtx.fit import memory_figures
from memtx.cli import ArgumentParser, resolve_config, run_cli
from memtx.flops import mfu
from memtx.step import make_train_step


def measure(cfg, steps: int, fill_knn: bool = False) -> dict:
    """Compile time, median step time, tokens/s, MFU and XLA's memory analysis of the compiled step
    (bytes per device: arguments, outputs, temporaries, aliased); `fill_knn` marks every kNN store full."""
    setup = state_lib.build(cfg)
    state = state_lib.init_state(setup, seed=0)
    memory = state_lib.init_memory_sharded(setup, cfg.data.batch_size)
    if fill_knn:
        for store in memory["knn"].values():
            store["count"] = jnp.full_like(store["count"], cfg.model.knn.size)
    train_step = make_train_step(setup)
    B, N = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batch = state_lib.device_batch(setup, {
        "inputs": rng.integers(0, 256, (B, N), dtype=np.int32), "targets": rng.integers(0, 256, (B, N), dtype=np.int32),
        "weights": np.ones((B, N), np.float32), "reset": np.zeros((B,), bool)})
    t0 = time.perf_counter()
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.rules(cfg)):
        compiled = train_step.jitted.lower(state, memory, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        state, memory, metrics = compiled(state, memory, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, memory, metrics = compiled(state, memory, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    utilisation = mfu(cfg, B * N / median, len(setup.mesh.devices.flat), setup.mesh.devices.flat[0].device_kind)
    return {"compile_s": compile_s, "step_ms": median * 1e3, "tokens_per_s": B * N / median, "mfu": utilisation,
            **memory_figures(compiled)}


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    devices = jax.devices()
    print(f"{args.config}: {cfg.model.num_layers} layers, d {cfg.model.d_model}, batch {cfg.data.batch_size} x "
          f"segment {cfg.data.seq_len}, {cfg.model.dtype}; {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})")
    print("| memory M | compile (s) | median step (ms) | tokens/s | MFU |")
    print("|---------:|------------:|-----------------:|---------:|----:|")
    for mem_len in (0, cfg.data.seq_len):
        c = copy.deepcopy(cfg)
        c.model.mem_len = mem_len
        r = measure(c, args.steps)
        utilisation = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"  # no peak FLOP/s known for CPUs
        print(f"| {mem_len:8d} | {r['compile_s']:11.1f} | {r['step_ms']:16.1f} | {r['tokens_per_s']:8,.0f} | "
              f"{utilisation} |", flush=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/txl.py:cpu")
    p.add_argument("--steps", type=int, default=20)
    sys.exit(run_cli(main, p))
