"""What `model.remat` saves and costs: the train step with each rematerialisation policy.

    python benchmarks/remat_memory.py [--config configs/txl.py:wt103] [--policies ,nothing_saveable,...]
                                      [--steps 10] [--config.KEY=VALUE ...]

For each policy ("" is no remat), in one run on this machine's devices: XLA's memory analysis of the
compiled step on one device (temporaries: what the backward pass keeps, the part remat shrinks), its
FLOPs as XLA counts them (the forward pass run again), the median step time over `--steps` steps and
tokens/s. Synthetic byte tokens. XLA:CPU reports no smaller temporaries for remat (docs/scale.md): the
figure that matters is an accelerator's (benchmarks/accelerator_suite.sh). A TPU's, estimated without
one: benchmarks/tpu_estimate.py --set model.remat=POLICY.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax

from benchmarks.step_time import measure
from memtx.cli import ArgumentParser, UsageError, resolve_config, run_cli
from memtx.config import REMAT_POLICIES

MIB = 2**20


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    policies = args.policies.split(",")
    unknown = [p for p in policies if p and p not in REMAT_POLICIES]
    if unknown:
        raise UsageError(f"unknown remat policy {unknown[0]!r}; known: {', '.join(REMAT_POLICIES)} ('' for none)")
    devices = jax.devices()
    print(f"{args.config}: {cfg.model.num_layers} layers, d {cfg.model.d_model}, memory {cfg.model.memory}, batch "
          f"{cfg.data.batch_size} x segment {cfg.data.seq_len}, {cfg.model.dtype}; {len(devices)} x "
          f"{devices[0].device_kind} ({jax.default_backend()})")
    print("| model.remat | temporaries (MiB per device) | vs none | step (ms) | vs none | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for policy in policies:
        c = copy.deepcopy(cfg)
        c.model.remat = policy
        r = measure(c, args.steps)
        base = base or r
        print(f"| {policy or '(none)'} | {r['temporaries'] / MIB:,.1f} | {r['temporaries'] / max(base['temporaries'], 1):.2f}x | "
              f"{r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f}x | {r['tokens_per_s']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/txl.py:wt103")
    p.add_argument("--policies", default="," + ",".join(REMAT_POLICIES[:3]),
                   help="comma-separated jax.checkpoint_policies names; an empty one is no remat (the baseline)")
    p.add_argument("--steps", type=int, default=10)
    sys.exit(run_cli(main, p))
