"""Long-document evaluation of a checkpoint: perplexity and bits per byte.

    python -m memtx.evaluate --workdir runs/txl_cpu [--split test] [--step N] [--config.model.mem_len=256]

Held-out documents are streamed in a fixed order, one per row; memory is carried inside a
document and reset between documents. The memory length may differ from training's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import numpy as np

from memtx import state as state_lib
from memtx.checkpoint import Checkpointer
from memtx.cli import ArgumentParser, UsageError, resolve_config, run_cli
from memtx.config import Config
from memtx.data import DocumentStream, count_tokens, list_documents, split_documents
from memtx.metrics import Progress, format_duration
from memtx.step import make_eval_step


def evaluate(setup: state_lib.Setup, params, docs, *, log_every: int = 50, verbose: bool = True) -> dict:
    """Streams `docs` through the model; returns NLL sum, token count, perplexity, bits/byte."""
    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    rows = B // jax.process_count()
    stream = DocumentStream(docs, rows, N, shuffle=False, repeat=False,
                            shard_index=jax.process_index(), num_shards=jax.process_count())
    eval_step = make_eval_step(setup)
    memory = state_lib.init_memory_sharded(setup, B)
    total_tokens = count_tokens(docs)
    nll_sum, tokens, segments, t0 = 0.0, 0.0, 0, time.perf_counter()
    progress = Progress(total_tokens, unit="tokens")
    pending = []
    while True:
        # Multi-host: every process steps until all are done (their shards may differ in length).
        batch = stream.next_batch()
        any_left = batch is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            any_left = bool(multihost_utils.process_allgather(np.array(any_left)).any())
        if not any_left:
            break
        if batch is None:
            batch = idle_batch(rows, N)
        memory, nll, count = eval_step(params, memory, state_lib.device_batch(setup, batch))
        pending.append((nll, count))
        segments += 1
        if segments % log_every == 0:
            for n, c in jax.device_get(pending):
                nll_sum, tokens = nll_sum + float(n), tokens + float(c)
            if verbose:
                progress.report(int(tokens), (len(pending)) * B * N, f"({tokens / max(total_tokens, 1):.0%})")
            pending.clear()
    for n, c in jax.device_get(pending):
        nll_sum, tokens = nll_sum + float(n), tokens + float(c)
    seconds = time.perf_counter() - t0
    return {"nll_sum": nll_sum, "tokens": int(tokens), "documents": len(docs),
            "perplexity": math.exp(nll_sum / max(tokens, 1)),
            "bits_per_byte": nll_sum / (math.log(2) * max(tokens, 1)),  # byte vocabulary: token = byte
            "seconds": seconds}


def idle_batch(rows: int, seq_len: int) -> dict:
    from memtx.data.tokenizer import PAD_ID
    return {"inputs": np.full((rows, seq_len), PAD_ID, np.int32), "targets": np.full((rows, seq_len), PAD_ID, np.int32),
            "weights": np.zeros((rows, seq_len), np.float32), "reset": np.zeros((rows,), bool)}


def format_table(rows: list[dict]) -> str:
    header = ["split", "memory", "segment", "documents", "tokens", "perplexity", "bits/byte", "wall time"]
    lines = [[r["split"], str(r["mem_len"]), str(r["seq_len"]), str(r["documents"]), f"{r['tokens']:,}",
              f"{r['perplexity']:.3f}", f"{r['bits_per_byte']:.4f}", format_duration(r["seconds"])] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if not os.path.isdir(args.workdir):
        raise UsageError(f"work directory '{args.workdir}' does not exist")
    cfg: Config = resolve_config(args.config, args.workdir, rest)
    if args.split:
        cfg.data.eval_split = args.split
    setup = state_lib.build(cfg)
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), async_save=False)
    step = args.step if args.step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise UsageError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}")
    params = ckpt.restore_params(step, setup.abstract_state["params"])
    docs = split_documents(list_documents(cfg.data.corpus), cfg.data.eval_split, cfg.data.split_fractions)
    if cfg.data.eval_max_docs:
        docs = docs[:cfg.data.eval_max_docs]
    print(f"evaluating step {step} on {len(docs)} {cfg.data.eval_split} documents, "
          f"memory {cfg.model.mem_len}, segment {cfg.data.seq_len}", flush=True)
    result = evaluate(setup, params, docs)
    result.update(split=cfg.data.eval_split, mem_len=cfg.model.mem_len, seq_len=cfg.data.seq_len, step=step)
    out = os.path.join(args.workdir, f"eval_{cfg.data.eval_split}_mem{cfg.model.mem_len}_step{step}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table([result]))
    print(f"results written to {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training work directory (config.json, checkpoints/)")
    p.add_argument("--config", help="a config file instead of WORKDIR/config.json")
    p.add_argument("--split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--step", type=int, help="checkpoint step; default: the latest")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
