"""Generated tokens/s of memtx.generate's Generator, per memory kind, on the CPU presets.

    python benchmarks/generate_speed.py [--tokens 256] [--prompt 512] [--config.KEY=VALUE ...]

For each of configs/txl.py:cpu (XL cache), configs/knn.py:cpu (XL + kNN store) and
configs/lamemo.py:cpu, with freshly initialised parameters (speed does not depend on training):
reads a prompt of random bytes, then generates tokens by sampling, and prints the prompt's
tokens/s (whole segments) and the generated tokens/s (one segment forward per token), after a
warm-up that compiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import numpy as np

from memtx import state as state_lib
from memtx.cli import ArgumentParser, resolve_config, run_cli
from memtx.data import tokenizer
from memtx.generate import Generator, sample

ROOT = os.path.join(os.path.dirname(__file__), "..")
PRESETS = ["configs/txl.py:cpu", "configs/knn.py:cpu", "configs/lamemo.py:cpu"]


def measure(cfg, prompt_len: int, tokens: int) -> dict:
    setup = state_lib.build(cfg)
    params = jax.device_get(state_lib.init_state(setup, seed=0)["params"])
    gen = Generator(cfg, params, tokenizer.PAD_ID)
    rng = np.random.default_rng(0)
    prompt = rng.integers(32, 127, prompt_len)
    gen.start_document(tokenizer.BOS_ID)  # warm-up: compiles the one segment forward
    gen.feed(prompt[:cfg.data.seq_len])
    gen.next_logits()
    t0 = time.perf_counter()
    gen.start_document(tokenizer.BOS_ID)
    gen.feed(prompt)
    np.asarray(gen.next_logits())
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(tokens):
        gen.feed([sample(gen.next_logits(), rng, allowed=256)])
    np.asarray(gen.next_logits())
    gen_s = time.perf_counter() - t0
    return {"prompt_tok_s": prompt_len / prompt_s, "gen_tok_s": tokens / gen_s, "ms_per_token": 1000 * gen_s / tokens}


def main(args: argparse.Namespace, rest: list[str]) -> int:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
          f"prompt {args.prompt} tokens, {args.tokens} generated")
    print("| config | memory | segment | prompt tokens/s | generated tokens/s | ms/token |")
    print("|---|---|---|---:|---:|---:|")
    for preset in args.configs.split(","):
        cfg = resolve_config(os.path.join(ROOT, preset), None, rest)
        m = cfg.model
        memory = (f"{m.memory_type} {m.mem_len}") + (f" + kNN {m.knn.size}" if m.knn.enabled else "")
        r = measure(cfg, args.prompt, args.tokens)
        print(f"| {preset} | {memory} | {cfg.data.seq_len} | {r['prompt_tok_s']:,.0f} | {r['gen_tok_s']:,.1f} | "
              f"{r['ms_per_token']:.2f} |", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--configs", default=",".join(PRESETS), help="comma-separated config specs, relative to the repository")
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
