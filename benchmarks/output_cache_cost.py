"""What the output cache costs in evaluation: one checkpoint's evaluation of the same documents
without the cache and with it at each size, each timed after a first, compiling pass.

    PYTHONPATH=. .venv/bin/python benchmarks/output_cache_cost.py --workdir runs/default/xl/seed0 \
        [--docs 64] [--sizes 256,1024,3072] [--scorer continuous] [--k 0] [--repeats 2]

Prints seconds per pass (the best of --repeats after the compiling one), tokens/s and the ratio
to the evaluation without the cache. The cache's settings do not change its cost (theta 16,
lambda 0.3 here).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from memtx import state as state_lib
from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, parse_int_list, resolve_config, run_cli
from memtx.data import FileSource, load_vocab
from memtx.data.sources import file_documents
from memtx.evaluation import evaluate
from memtx.memory.output_cache import CacheSpec
from memtx.metrics import markdown_table
from memtx.step import init_cache_memory, make_cache_eval_step, make_eval_step


def main(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = resolve_config(None, args.workdir, rest)
    setup = state_lib.build(cfg)
    ckpt = run_checkpointer(cfg, args.workdir, async_save=False)
    step = ckpt.latest_good_step()
    params = ckpt.restore_params(step, setup.abstract_state["params"])
    docs = file_documents(cfg.data, cfg.data.eval_split)[:args.docs]
    vocab = load_vocab(cfg.data.vocab)
    source_fn = lambda i, n: FileSource(docs, vocab=vocab, shuffle=False, repeat=False, shard_index=i,  # noqa: E731
                                        num_shards=n, max_tokens=cfg.data.eval_doc_tokens)
    B = cfg.data.eval_batch_size

    def timed(step_fn, init_memory=None):
        seconds, result = [], None
        for _ in range(args.repeats + 1):  # the first pass compiles
            t0 = time.perf_counter()
            result = evaluate(setup, params, source_fn, verbose=False, step_fn=step_fn, init_memory=init_memory)
            seconds.append(time.perf_counter() - t0)
        return min(seconds[1:]), result

    base_s, base = timed(make_eval_step(setup))
    rows = [["none", f"{base_s:.2f}", f"{base['tokens'] / base_s:,.0f}", "1.00", f"{base['perplexity']:.3f}"]]
    for size in parse_int_list("--sizes", args.sizes):
        spec = CacheSpec(size, scorer=args.scorer, k=args.k, theta=16.0, lam=0.3)
        s, result = timed(make_cache_eval_step(setup, spec), lambda: init_cache_memory(setup, spec, B))
        rows.append([f"{args.scorer} {size}" + (f" top {args.k}" if args.k else ""), f"{s:.2f}",
                     f"{result['tokens'] / s:,.0f}", f"{s / base_s:.2f}", f"{result['perplexity']:.3f}"])
    print(f"{args.workdir} step {step}: {len(docs)} {cfg.data.eval_split} documents, {base['tokens']:,} tokens, "
          f"batch {B} x {cfg.data.seq_len}, on {jax.devices()[0].device_kind} (best of {args.repeats} after compiling)")
    print(markdown_table(["output cache", "seconds", "tokens/s", "x without", "perplexity (unfitted)"], rows))
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--sizes", default="256,1024,3072")
    p.add_argument("--scorer", choices=["continuous", "knn_lm"], default="continuous")
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
