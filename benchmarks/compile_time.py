"""Compile time of the train step against depth, the layers unrolled and as one scan (`model.scan_layers`).

    python benchmarks/compile_time.py [--config configs/txl.py:cpu] [--depths 2,4,8,16] [--steps 3]
                                      [--config.KEY=VALUE ...]

For each depth (`model.num_layers`) and both layouts, in one run: the time to trace, lower and compile
the jitted train step, and its median step time over `--steps` steps (after 2 warm-up steps), so that
the price of the scan at run time is beside what it saves at compile time. Synthetic byte tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax

from benchmarks.step_time import measure
from memtx.cli import ArgumentParser, resolve_config, run_cli


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    depths = [int(d) for d in args.depths.split(",")]
    devices = jax.devices()
    print(f"{args.config}: d {cfg.model.d_model}, memory {cfg.model.memory} {cfg.model.mem_len}, batch "
          f"{cfg.data.batch_size} x segment {cfg.data.seq_len}, {cfg.model.dtype}; {len(devices)} x "
          f"{devices[0].device_kind} ({jax.default_backend()})")
    print("| layers | compile unrolled (s) | compile scanned (s) | step unrolled (ms) | step scanned (ms) |")
    print("|-------:|---------------------:|--------------------:|-------------------:|------------------:|")
    for depth in depths:
        row = {}
        for scan in (False, True):
            c = copy.deepcopy(cfg)
            c.model.num_layers, c.model.scan_layers = depth, scan
            if c.model.knn.enabled:  # keep the kNN layer the 4th from the top where the depth allows
                c.model.knn.layers = (max(0, depth - 4),)
            row[scan] = measure(c, args.steps)
        print(f"| {depth:6d} | {row[False]['compile_s']:20.1f} | {row[True]['compile_s']:19.1f} | "
              f"{row[False]['step_ms']:18.1f} | {row[True]['step_ms']:17.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/txl.py:cpu")
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--steps", type=int, default=3)
    sys.exit(run_cli(main, parser))
