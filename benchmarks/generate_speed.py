"""Generated tokens/s of memtx.generate's Generator, per memory kind, on the CPU presets.

    python benchmarks/generate_speed.py [--tokens 256] [--prompt 512] [--config.KEY=VALUE ...]

For each of configs/txl.py:cpu (XL cache), configs/knn.py:cpu (XL + kNN store) and
configs/lamemo.py:cpu, with freshly initialised parameters (speed does not depend on training):
reads a prompt of random bytes, then generates tokens by sampling, and prints the prompt's
tokens/s (whole segments) and the generated tokens/s, with the in-segment key/value cache (one
row per token through the layers) and without it (one whole-segment forward per token), after a
warm-up that compiles both.
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
from memtx.memory import registry

ROOT = os.path.join(os.path.dirname(__file__), "..")
PRESETS = ["configs/txl.py:cpu", "configs/knn.py:cpu", "configs/lamemo.py:cpu"]


def measure(cfg, params, prompt_len: int, tokens: int, kv_cache: bool) -> dict:
    gen = Generator(cfg, params, tokenizer.PAD_ID, kv_cache=kv_cache)
    rng = np.random.default_rng(0)
    prompt = rng.integers(32, 127, prompt_len)
    warm = rng.integers(32, 127, cfg.data.seq_len + 4)
    gen.start_document(tokenizer.BOS_ID)  # warm-up: compiles the segment forward and the cached step
    gen.feed(warm[:cfg.data.seq_len + 1])
    for token in warm[cfg.data.seq_len + 1:]:
        gen.next_logits()
        gen.feed([token])
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
    print("| config | memory | segment | prompt tokens/s | generated tokens/s (ms/token), key/value cache | "
          "without the cache | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    for preset in args.configs.split(","):
        in_repo = os.path.join(ROOT, preset)  # a path relative to the repository, or a name (txl:cpu)
        cfg = resolve_config(in_repo if os.path.isfile(in_repo.partition(":")[0]) else preset, None, rest)
        m = cfg.model
        memory = registry.describe(m)
        params = jax.device_get(state_lib.init_state(state_lib.build(cfg), seed=0)["params"])
        cached = measure(cfg, params, args.prompt, args.tokens, kv_cache=True)
        whole = measure(cfg, params, args.prompt, args.tokens, kv_cache=False)
        note = "" if registry.of(m).kv_cache else f" ({registry.of(m).label}: no cache)"
        print(f"| {preset} | {memory} | {cfg.data.seq_len} | {cached['prompt_tok_s']:,.0f} | "
              f"{cached['gen_tok_s']:,.1f} ({cached['ms_per_token']:.2f}){note} | "
              f"{whole['gen_tok_s']:,.1f} ({whole['ms_per_token']:.2f}) | "
              f"{cached['gen_tok_s'] / whole['gen_tok_s']:.2f}x |", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--configs", default=",".join(PRESETS), help="comma-separated config specs: paths relative to the repository or names (txl:cpu)")
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
