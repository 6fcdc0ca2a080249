"""Train-step time with a kNN memory of growing size, as a ratio to the same model without one,
and the lookup's time beside its floor (the scoring matmul alone).

    python benchmarks/knn_step_time.py [--config configs/knn.py:cpu] [--sizes 0,1536,8192,65536,262144]
        [--steps 5] [--config.model.knn.backend=chunked ...]

Size 0 is the baseline: the same model with the kNN memory switched off. Every store is full
(the steady state of a long document). Synthetic byte tokens: this measures the model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_time import measure
from memtx.cli import ArgumentParser, resolve_config, run_cli
from memtx.memory import knn


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lookup_times(cfg, size: int, repeats: int) -> tuple[float, float]:
    """(median lookup seconds, median seconds of the scoring matmul alone) for one memory layer."""
    m, c = cfg.model, cfg.model.knn
    B, H, N, D = cfg.data.batch_size, m.num_heads, cfg.data.seq_len, m.dim_per_head
    rng = np.random.default_rng(0)
    store = knn.init(B, H, size, D, jnp.dtype(c.dtype))
    store = {**store, "keys": jnp.asarray(rng.standard_normal(store["keys"].shape), c.dtype),
             "count": jnp.full((B,), size, jnp.int32)}
    queries = jnp.asarray(rng.standard_normal((B, H, N, D)), jnp.dtype(m.dtype))
    search = jax.jit(lambda s, q: knn.search(s, q, c.k, c.backend, c.recall_target, c.chunk_size)[:2])
    floor = jax.jit(lambda s, q: jnp.einsum("bhnd,bhsd->bhns", q, s["keys"].astype(q.dtype),
                                            preferred_element_type=jnp.float32).max(-1))
    return timed(search, store, queries, repeats=repeats), timed(floor, store, queries, repeats=repeats)


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    sizes = [int(s) for s in args.sizes.split(",")]
    device = jax.devices()[0]
    m = cfg.model
    print(f"{args.config}: {m.num_layers} layers, d {m.d_model}, {m.num_heads} heads x {m.dim_per_head}, "
          f"batch {cfg.data.batch_size} x segment {cfg.data.seq_len}, XL cache {m.mem_len}, k {m.knn.k}, "
          f"backend {m.knn.backend}, store {m.knn.dtype}; {jax.device_count()} x {device.device_kind}")
    print("| kNN memory | step (ms) | ratio to no memory | tokens/s | lookup (ms) | scoring matmul floor (ms) |")
    print("|-----------:|----------:|-------------------:|---------:|------------:|--------------------------:|")
    base = None
    for size in sizes:
        c = copy.deepcopy(cfg)
        c.model.knn.enabled = size > 0
        c.model.knn.size = max(size, c.model.knn.k)
        r = measure(c, args.steps, fill_knn=True)
        base = base or r["step_ms"] if size == 0 else base
        ratio = f"{r['step_ms'] / base:.2f}x" if base else "-"
        lookup, floor = lookup_times(c, size, args.steps) if size else (0.0, 0.0)
        print(f"| {size:10,d} | {r['step_ms']:9.1f} | {ratio:>18} | {r['tokens_per_s']:8,.0f} | "
              f"{lookup * 1e3:11.1f} | {floor * 1e3:25.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/knn.py:cpu")
    p.add_argument("--sizes", default="0,1536,8192,65536,262144")
    p.add_argument("--steps", type=int, default=5)
    sys.exit(run_cli(main, p))
