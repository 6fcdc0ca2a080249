"""Train-step time of LaMemo against Transformer-XL at the same config, in one run, and the
compiled step's FLOPs per predicted token (XLA's count) beside the paper's.

    python benchmarks/lamemo_step_time.py [--config configs/lamemo.py:cpu] [--steps 10] [--config.KEY=VALUE ...]
    python benchmarks/lamemo_step_time.py --config configs/lamemo.py:wt103 --flops-only

The paper counts 191M against 157M FLOPs per predicted token on WikiText-103 (LaMemo / XL, 1.22x,
forward). `--flops-only` compiles both train steps without running them (any preset, on a CPU) and
reports XLA's FLOP count of the whole train step (forward + backward + update) per token.
Synthetic byte tokens: this measures the model, not the data pipeline.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn
import jax

from benchmarks.step_time import measure
from memtx import batch as batch_layout, sharding, state as state_lib
from memtx.cli import ArgumentParser, resolve_config, run_cli
from memtx.config import validate
from memtx.fit import cost_figures
from memtx.step import make_eval_step, make_train_step

PAPER_FLOPS_RATIO = 191 / 157


def compiled_flops(cfg) -> dict:
    """XLA's FLOPs of one train step and of one forward (evaluation) step, compiled from abstract
    shapes only, and the compile seconds of the train step."""
    setup = state_lib.build(cfg)
    B = cfg.data.batch_size
    memory = state_lib.abstract_memory(setup, B)
    batch = batch_layout.abstract(B, cfg.data.seq_len, state_lib.batch_shardings(setup))

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.rules(cfg)):
        t0 = time.perf_counter()
        train = make_train_step(setup).jitted.lower(setup.abstract_state, memory, batch).compile()
        compile_s = time.perf_counter() - t0
        forward = make_eval_step(setup).jitted.lower(setup.abstract_state["params"], memory, batch).compile()
    return {"train_flops": cost_figures(train)["flops"], "forward_flops": cost_figures(forward)["flops"],
            "compile_s": compile_s}


def main(args, rest) -> int:
    cfg = resolve_config(args.config, None, rest)
    devices = jax.devices()
    validate(cfg, len(devices))
    B, N, M = cfg.data.batch_size, cfg.data.seq_len, cfg.model.mem_len
    print(f"{args.config}: {cfg.model.num_layers} layers, d {cfg.model.d_model}, batch {B} x segment {N}, memory {M}, "
          f"{cfg.model.dtype}; {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})", flush=True)
    runs = {}
    for memory in ("xl", "lamemo"):
        c = copy.deepcopy(cfg)
        c.model.memory = memory
        runs[memory] = compiled_flops(c)
        if not args.flops_only:
            runs[memory].update(measure(c, args.steps))
    print("| memory | compile (s) | forward MFLOPs/token | train-step MFLOPs/token | median step (ms) | tokens/s |")
    print("|--------|------------:|---------------------:|------------------------:|-----------------:|---------:|")
    for name, r in runs.items():
        timing = (f"{r['step_ms']:16.1f} | {r['tokens_per_s']:8,.0f}" if "step_ms" in r else f"{'-':>16} | {'-':>8}")
        print(f"| {name:6} | {r['compile_s']:11.1f} | {r['forward_flops'] / (B * N) / 1e6:20.1f} | "
              f"{r['train_flops'] / (B * N) / 1e6:23.1f} | {timing} |")
    xl, la = runs["xl"], runs["lamemo"]
    print(f"LaMemo / Transformer-XL: forward FLOPs {la['forward_flops'] / xl['forward_flops']:.2f}x "
          f"(the paper on WikiText-103: {PAPER_FLOPS_RATIO:.2f}x), train-step FLOPs "
          f"{la['train_flops'] / xl['train_flops']:.2f}x"
          + ("" if args.flops_only else f", step time {la['step_ms'] / xl['step_ms']:.2f}x (target on an accelerator: "
                                        "at most 1.3x)"))
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/lamemo.py:cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--flops-only", action="store_true", help="compile both steps and count FLOPs; run nothing")
    sys.exit(run_cli(main, p))
