"""Train-step time with a kNN memory of growing size, per search backend, as a ratio to the same
model without one; the lookup's time beside its floor (the scoring matmul alone), XLA's peak
temporary memory of the lookup, and recall@k of approximate backends against exact search.

    python benchmarks/knn_step_time.py [--config configs/knn.py:cpu] [--sizes 0,1536,8192,65536,262144]
        [--backends exact,blocked,bucketed] [--steps 5] [--lookup-only] [--config.KEY=VALUE ...]

Size 0 is the baseline: the same model with the kNN memory switched off. Every store is full
(the steady state of a long document). Synthetic byte tokens: this measures the model. To time
this tree against an earlier commit in one run: benchmarks/compare_revisions.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_time import measure
from memtx.cli import ArgumentParser, UsageError, resolve_config, run_cli
from memtx.config import KNNConfig
from memtx.memory import knn


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lookup_figures(cfg, size: int, repeats: int) -> dict:
    """One memory layer's lookup over a full store of random unit keys: median seconds, the floor
    (the scoring matmul alone), XLA's temporary bytes, and recall@k against exact search."""
    m, c = cfg.model, cfg.model.knn
    B, H, N, D = cfg.data.batch_size, m.num_heads, cfg.data.seq_len, m.dim_per_head
    rng = np.random.default_rng(0)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    keys_BHSD, queries_BHND = jnp.asarray(unit((B, H, size, D))), jnp.asarray(unit((B, H, N, D)))
    store = knn.init(B, H, size, D, c.dtype)
    store = {**store, "keys": knn.quantize_keys(keys_BHSD, store["keys"].dtype), "count": jnp.full((B,), size, jnp.int32)}
    queries = queries_BHND.astype(m.dtype)
    search = jax.jit(functools.partial(knn.search, k=c.k, backend=c.backend, recall_target=c.recall_target,
                                       chunk_size=c.chunk_size, bucket_size=c.bucket_size))
    floor = jax.jit(lambda s, q: jnp.einsum("bhnd,bhsd->bhns", q, knn.stored_keys(s["keys"], q.dtype),
                                            preferred_element_type=jnp.float32).max(-1))
    temp = search.lower(store, queries).compile().memory_analysis()
    out = {"lookup_s": timed(lambda s, q: search(s, q)[:2], store, queries, repeats=repeats),
           "floor_s": timed(floor, store, queries, repeats=repeats),
           "temp_bytes": getattr(temp, "temp_size_in_bytes", 0) if temp is not None else 0, "recall": None}
    if knn.resolve_backend(c.backend, size) not in knn.EXACT_BACKENDS or c.dtype != "float32":
        exact = knn.search({**store, "keys": keys_BHSD}, queries_BHND, c.k, "exact")  # float32, whole matrix
        got = search(store, queries)
        out["recall"] = knn.recall(exact, got)
    return out


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",") if args.backends else [cfg.model.knn.backend]
    for name in backends:
        if name not in knn.BACKENDS:
            raise UsageError(f"--backends: unknown backend '{name}' (one of {', '.join(knn.BACKENDS)})")
    device = jax.devices()[0]
    m = cfg.model
    print(f"{args.config}: {m.num_layers} layers, d {m.d_model}, {m.num_heads} heads x {m.dim_per_head}, "
          f"batch {cfg.data.batch_size} x segment {cfg.data.seq_len}, XL cache {m.mem_len}, k {m.knn.k}, "
          f"store {m.knn.dtype}, tiles of {m.knn.chunk_size}; {jax.device_count()} x {device.device_kind}")
    print("| backend | kNN memory | step (ms) | ratio to no memory | tokens/s | lookup (ms) | floor (ms) "
          "| lookup / floor | lookup temp (MiB) | recall@k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for size in sizes:
        for name in backends if size else backends[:1]:
            c = copy.deepcopy(cfg)
            if size:
                c.model.knn.enabled, c.model.knn.size, c.model.knn.backend = True, max(size, c.model.knn.k), name
            else:  # the same model without the memory: every kNN option at its default (the config
                c.model.knn = KNNConfig()  # refuses kNN options with the memory off, knn.layers included)
            step = None if args.lookup_only else measure(c, args.steps, fill_knn=True)
            if size == 0:
                base = step and step["step_ms"]
            look = lookup_figures(c, size, args.steps) if size else None
            resolved = knn.resolve_backend(name, size)
            label = ("(none)" if not size else name if resolved == name else f"{name} ({resolved})")
            step_txt = f"{step['step_ms']:.1f} | {step['step_ms'] / base:.2f}x | {step['tokens_per_s']:,.0f}" \
                if step and base else "- | - | -"
            look_txt = (f"{look['lookup_s'] * 1e3:.1f} | {look['floor_s'] * 1e3:.1f} | "
                        f"{look['lookup_s'] / look['floor_s']:.2f}x | {look['temp_bytes'] / 2**20:,.0f} | "
                        + ("exact" if look["recall"] is None else f"{look['recall']:.3f}")) if look else "- | - | - | - | -"
            print(f"| {label} | {size:,d} | {step_txt} | {look_txt} |", flush=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/knn.py:cpu")
    p.add_argument("--sizes", default="0,1536,8192,65536,262144")
    p.add_argument("--backends", default="", help="comma-separated (default: the config's backend)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lookup-only", action="store_true", help="time the lookups alone, not the train step")
    sys.exit(run_cli(main, p))
