"""What a TPU slice would do with the paper presets, estimated on this machine (no TPU): each
preset's train step compiled ahead of time for a v5e-8 and a v4-16 slice (8 chips each: a v4
slice's number counts TensorCores, two per chip), libtpu from .venv/libtpu, and per chip:

- XLA's memory analysis: arguments, temporaries, outputs, and whether they fit the chip's HBM;
- XLA's cost analysis: FLOPs and bytes accessed;
- a roofline step time, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth);
- the kNN memory's step time over the same model without it, at 8K, 65K and 262K slots, beside
  the Memorizing Transformer paper's measured 1.25x at 8K and 3.0x at 65K (TPUv3).

A roofline cannot see what XLA does not cost: the approximate top-k is a custom call
(PartialReduce) whose work XLA's cost analysis may leave out, collectives over the slice's links,
and how far each kernel runs from the chip's peak. Treat the times as lower bounds.

    .venv/bin/python benchmarks/tpu_estimate.py [--slices v5e-8,v4-16] [--presets A,B] [--out FILE.json]
        [--set model.scan_layers=true --set model.remat=nothing_saveable]

`--set` overrides every preset (and the no-memory baseline): the full shapes of the scan/remat
variants that CI compiles at reduced size (tests/test_tpu_compile.py). 2 to 14 minutes per
compile on 2 CPU cores (LaMemo at enwik8 the longest): run it in parts with --slices and --presets.
A program the TPU compiler refuses for want of HBM is a row that says so, with what it asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memtx import fit, tpu_aot  # noqa: E402
from memtx.cli import UsageError, resolve_config  # noqa: E402
from memtx.config import ConfigError, KNNConfig  # noqa: E402

PAPER_PRESETS = ["configs/txl.py:wt103", "configs/txl.py:enwik8", "configs/lamemo.py:wt103",
                 "configs/lamemo.py:enwik8", "configs/compressive.py:wt103", "configs/block_recurrent.py:pg19",
                 "configs/knn.py:paper_8192", "configs/knn.py:paper_65536", "configs/knn.py:paper_262144"]
NO_MEMORY = "configs/knn.py:paper_8192"  # its model without the kNN memory (every kNN option at its default)
PAPER_RATIOS = {8192: 1.25, 65536: 3.0}  # Wu et al. 2022, step time with the kNN memory / without (TPUv3)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def measure(name: str, target: str, overrides: list[str], without_memory: bool = False) -> dict:
    kind, chips, _ = fit.parse_target(target)
    cfg = resolve_config(name, None, [f"--config.{o}" for o in overrides])
    if without_memory:
        cfg.model.knn = KNNConfig()
    cfg = tpu_aot.for_slice(cfg, chips)
    t = time.perf_counter()
    try:
        compiled = fit.compile_steps(cfg, fit.tpu_topology_devices(kind, chips))["train"]
        row = tpu_aot.analysis(compiled, kind)
    except Exception as e:  # the TPU compiler refuses a program whose temporaries exceed the chip's HBM
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
            raise
        row = {"arguments": 0, "outputs": 0, "aliased": 0, "temporaries": float(needed[1]) * 2**30,
               "flops": float("nan"), "bytes_accessed": float("nan"), "roofline_s": float("nan"),
               "refused": " ".join(str(e).split())[:300]}
    row.update(preset=name + (" without the kNN memory" if without_memory else ""), slice=target, kind=kind,
               chips=chips, overrides=overrides, scan_layers=cfg.model.scan_layers, batch=cfg.data.batch_size, compile_s=time.perf_counter() - t,
               fits="refused" not in row and row["arguments"] + row["temporaries"] + row["outputs"] - row["aliased"]
               <= fit.DEVICE_BYTES[kind])
    print(f"  {row['preset']} on {target}: compiled in {row['compile_s']:.0f}s; {json.dumps(row)}",
          file=sys.stderr, flush=True)  # each row as it comes: a long run stopped keeps what it measured
    return row


def search_cost(kind: str, queries: int = 512, slots: int = 65536, dim: int = 128, k: int = 32) -> list[dict]:
    """What XLA's cost analysis counts for the kNN search alone, compiled for one chip of a `kind`
    slice: scores of `queries` queries against `slots` keys of `dim`, then nothing, the approximate
    top-k (PartialReduce) or the exact one (TopK) of each row."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    one = SingleDeviceSharding(fit.tpu_topology_devices(kind, 8)[0])
    q = jax.ShapeDtypeStruct((queries, dim), jnp.float32, sharding=one)
    keys = jax.ShapeDtypeStruct((slots, dim), jnp.float32, sharding=one)
    searches = {"scores alone (their row sums)": lambda q, keys: (q @ keys.T).sum(-1),
                "scores + approx_max_k": lambda q, keys: jax.lax.approx_max_k(q @ keys.T, k)[0],
                "scores + top_k (exact)": lambda q, keys: jax.lax.top_k(q @ keys.T, k)[0]}
    return [{"search": name, **fit.cost_figures(jax.jit(search).lower(q, keys).compile())}
            for name, search in searches.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="v5e-8,v4-16", help="comma-separated, as Google names them (v4-16: 8 chips)")
    p.add_argument("--presets", default=",".join(PAPER_PRESETS), help="comma-separated (default: the paper presets)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every preset, e.g. model.remat=nothing_saveable")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args()
    try:
        slices = [(s, *fit.parse_target(s)[:2]) for s in args.slices.split(",")]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not fit.find_libtpu():
        print("error: libtpu is not installed (bash scripts/setup_env.sh puts it in .venv/libtpu)", file=sys.stderr)
        return 2
    rows = []
    try:
        for target, _, _ in slices:
            for name in args.presets.split(","):
                rows.append(measure(name, target, args.set))
            if any(":paper_" in name for name in args.presets.split(",")):  # the ratios' baseline
                rows.append(measure(NO_MEMORY, target, args.set, without_memory=True))
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.set:
        print(f"every preset with {' '.join(args.set)}\n")
    if any(r["scan_layers"] for r in rows):
        print("model.scan_layers: XLA's cost analysis counts a loop's body once, so a scanned run's FLOPs and bytes "
              "(and the roofline) are undercounted by its length; the memory analysis holds.\n")
    print("| preset | slice | batch | arguments / temporaries / outputs (GiB per chip) | fits | TFLOPs | GB accessed | roofline ms |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        if "refused" in r:  # what the compiler said it needed, and nothing else to show
            print(f"| `{r['preset']}` | {r['slice']} | {r['batch']} | temporaries alone {_gib(r['temporaries'])} | "
                  f"no: the TPU compiler refuses it | - | - | - |")
            continue
        print(f"| `{r['preset']}` | {r['slice']} | {r['batch']} | {_gib(r['arguments'])} / "
              f"{_gib(r['temporaries'])} / {_gib(r['outputs'])} | {'yes' if r['fits'] else 'no'} | "
              f"{r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | {r['roofline_s'] * 1e3:.1f} |")
    if any(r["preset"].endswith(" without the kNN memory") for r in rows):
        print()
        print("| slice | kNN slots | roofline kNN / no memory | the paper (TPUv3, measured) |")
        print("|---|---:|---:|---:|")
    for target, _, _ in slices:
        base = next((r for r in rows if r["slice"] == target and r["preset"] == NO_MEMORY + " without the kNN memory"),
                    None)
        if base is None:
            continue
        for size in (8192, 65536, 262144):
            r = next((r for r in rows if r["slice"] == target and r["preset"] == f"configs/knn.py:paper_{size}"), None)
            if r is None:
                continue
            paper = f"{PAPER_RATIOS[size]:.2f}x" if size in PAPER_RATIOS else "-"
            print(f"| {target} | {size:,} | {r['roofline_s'] / base['roofline_s']:.2f}x | {paper} |")
    kind = slices[0][1]
    search = search_cost(kind)
    print()
    print(f"What XLA's cost analysis counts for a search alone ({kind}, one chip: 512 queries x 65,536 keys of 128, top 32):")
    print()
    print("| search | GFLOPs | MB accessed |")
    print("|---|---:|---:|")
    for r in search:
        print(f"| {r['search']} | {r['flops'] / 1e9:.2f} | {r['bytes_accessed'] / 1e6:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": rows, "search_cost": search}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
