"""Tokens/s of the long-document loader alone (memtx.data.DocumentStream, training mode), beside
what the train step consumes, for the default config and for a TPU-scale batch.

    python benchmarks/loader_throughput.py [--config configs/txl.py:cpu] [--seconds 5] [--hosts 1]
        [--config.KEY=VALUE ...]
    python benchmarks/loader_throughput.py --config.data.task=stdlib   # the same corpus through seqio
    python benchmarks/loader_throughput.py --config.data.vocab=vocab/stdlib8k.model   # SentencePiece

Rows: the config's batch, then 256 rows of 512-token segments (2^17 tokens per step, the scale of
the papers' TPU runs) over the same corpus. With `--hosts H` each measurement is one host's share
(batch / H rows, every H-th document), which is what a host's loader must produce. The train-step
rate is measured for the config's batch only (a TPU-scale step does not run on a CPU). The loader
must never be what a step waits on: the last column wants to stay >= 10x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from memtx.cli import ArgumentParser, UsageError, resolve_config, run_cli
from memtx.data import DocumentStream, open_source

TPU_ROWS, TPU_SEQ_LEN = 256, 512  # 2^17 tokens per step


def loader_rate(data_cfg, rows: int, seq_len: int, seconds: float, shard_index: int, num_shards: int) -> dict:
    """Batches and tokens per second of one host's stream, after one warm-up batch."""
    source = open_source(data_cfg, "train", train=True, shard_index=shard_index, num_shards=num_shards)
    stream = DocumentStream(source, rows, seq_len)
    stream.next_batch()
    batches, tokens, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        stream.next_batch()
        batches += 1
        tokens += rows * seq_len
    elapsed = time.perf_counter() - t0
    return {"batches_per_s": batches / elapsed, "tokens_per_s": tokens / elapsed}


def main(args, rest) -> int:
    if args.hosts < 1 or args.seconds <= 0:
        raise UsageError("--hosts must be >= 1 and --seconds > 0")
    cfg = resolve_config(args.config, None, rest)
    B, N = cfg.data.batch_size, cfg.data.seq_len
    if B % args.hosts or TPU_ROWS % args.hosts:
        raise UsageError(f"--hosts {args.hosts} must divide the batch ({B}) and {TPU_ROWS}")
    source = open_source(cfg.data, "train", train=True, shard_index=0, num_shards=args.hosts)  # errors first
    where = f"seqio task '{cfg.data.task}'" if cfg.data.task else f"corpus '{cfg.data.corpus}' (files)"
    print(f"{where}: {source.num_docs or 'streamed'} training documents per host, vocabulary {source.vocab.name}; "
          f"one host of {args.hosts}", flush=True)
    step_tokens_per_s = None
    if not args.skip_step:
        from benchmarks.step_time import measure  # imports JAX only when timing the step
        step_tokens_per_s = measure(cfg, steps=10)["tokens_per_s"] / args.hosts  # one host's share
    print("| batch (global) | rows per host | segment | loader batches/s | loader tokens/s | train step tokens/s "
          "| loader / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows, seq_len, step_rate in ((f"{args.config} ({B} x {N})", B, N, step_tokens_per_s),
                                           (f"TPU scale ({TPU_ROWS} x {TPU_SEQ_LEN})", TPU_ROWS, TPU_SEQ_LEN, None)):
        r = loader_rate(cfg.data, rows // args.hosts, seq_len, args.seconds, 0, args.hosts)
        step = f"{step_rate:,.0f}" if step_rate else "-"
        ratio = f"{r['tokens_per_s'] / step_rate:,.0f}x" if step_rate else "-"
        print(f"| {name} | {rows // args.hosts} | {seq_len} | {r['batches_per_s']:,.1f} | {r['tokens_per_s']:,.0f} "
              f"| {step} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/txl.py:cpu")
    p.add_argument("--seconds", type=float, default=5.0, help="time each loader measurement runs")
    p.add_argument("--hosts", type=int, default=1, help="measure one host's share of H")
    p.add_argument("--skip-step", action="store_true", help="do not time the train step")
    sys.exit(run_cli(main, p))
