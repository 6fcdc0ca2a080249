"""What a TPU slice would do with the paper presets, estimated on this machine (no TPU): each
preset's train step compiled ahead of time for a v5e and a v4 slice of 8 chips (libtpu from
.venv/libtpu), and per chip:

- XLA's memory analysis: arguments, temporaries, outputs, and whether they fit the chip's HBM;
- XLA's cost analysis: FLOPs and bytes accessed;
- a roofline step time, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth);
- the kNN memory's step time over the same model without it, at 8K, 65K and 262K slots, beside
  the Memorizing Transformer paper's measured 1.25x at 8K and 3.0x at 65K (TPUv3).

A roofline cannot see what XLA does not cost: the approximate top-k is a custom call
(PartialReduce) whose work XLA's cost analysis may leave out, collectives over the slice's links,
and how far each kernel runs from the chip's peak. Treat the times as lower bounds.

    .venv/bin/python benchmarks/tpu_estimate.py [--kinds v5e,v4] [--chips 8] [--presets A,B] [--out FILE.json]

About a minute per compile on 2 CPU cores (22 compiles: ~25 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memtx import fit, tpu_aot  # noqa: E402

PAPER_PRESETS = ["configs/txl.py:wt103", "configs/txl.py:enwik8", "configs/lamemo.py:wt103",
                 "configs/lamemo.py:enwik8", "configs/compressive.py:wt103", "configs/block_recurrent.py:pg19",
                 "configs/knn.py:paper_8192", "configs/knn.py:paper_65536", "configs/knn.py:paper_262144"]
NO_MEMORY = "configs/knn.py:paper_8192"  # its model without the kNN memory (every kNN option at its default)
PAPER_RATIOS = {8192: 1.25, 65536: 3.0}  # Wu et al. 2022, step time with the kNN memory / without (TPUv3)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def measure(name: str, kind: str, chips: int, without_memory: bool = False) -> dict:
    from memtx.config import KNNConfig, load_config_file
    cfg = tpu_aot.for_slice(load_config_file(name), chips)
    if without_memory:
        cfg.model.knn = KNNConfig()
    t = time.perf_counter()
    compiled = fit.compile_steps(cfg, fit.tpu_topology_devices(kind, chips))["train"]
    row = tpu_aot.analysis(compiled, kind)
    row.update(preset=name + (" without the kNN memory" if without_memory else ""), kind=kind, chips=chips,
               batch=cfg.data.batch_size, compile_s=time.perf_counter() - t,
               fits=row["arguments"] + row["temporaries"] + row["outputs"] - row["aliased"]
               <= fit.DEVICE_BYTES[kind])
    print(f"  {row['preset']} on {kind}-{chips}: compiled in {row['compile_s']:.0f}s; {json.dumps(row)}",
          file=sys.stderr, flush=True)  # each row as it comes: a long run stopped keeps what it measured
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="v5e,v4")
    p.add_argument("--chips", type=int, default=8)
    p.add_argument("--presets", default=",".join(PAPER_PRESETS), help="comma-separated (default: the paper presets)")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args()
    if not fit.find_libtpu():
        print("error: libtpu is not installed (bash scripts/setup_env.sh puts it in .venv/libtpu)", file=sys.stderr)
        return 2
    rows = []
    for kind in args.kinds.split(","):
        for name in args.presets.split(","):
            rows.append(measure(name, kind, args.chips))
        rows.append(measure(NO_MEMORY, kind, args.chips, without_memory=True))
    print("| preset | slice | batch | arguments / temporaries / outputs (GiB per chip) | fits | TFLOPs | GB accessed | roofline ms |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['preset']}` | {r['kind']}-{r['chips']} | {r['batch']} | {_gib(r['arguments'])} / "
              f"{_gib(r['temporaries'])} / {_gib(r['outputs'])} | {'yes' if r['fits'] else 'no'} | "
              f"{r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | {r['roofline_s'] * 1e3:.1f} |")
    print()
    print("| slice | kNN slots | roofline kNN / no memory | the paper (TPUv3, measured) |")
    print("|---|---:|---:|---:|")
    for kind in args.kinds.split(","):
        base = next(r for r in rows if r["kind"] == kind and r["preset"] == NO_MEMORY + " without the kNN memory")
        for size in (8192, 65536, 262144):
            r = next((r for r in rows if r["kind"] == kind and r["preset"] == f"configs/knn.py:paper_{size}"), None)
            if r is None:
                continue
            paper = f"{PAPER_RATIOS[size]:.2f}x" if size in PAPER_RATIOS else "-"
            print(f"| {kind}-{args.chips} | {size:,} | {r['roofline_s'] / base['roofline_s']:.2f}x | {paper} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
