"""Long-document evaluation of a checkpoint: perplexity and bits per byte.

    python -m memtx.evaluate --workdir runs/txl_cpu [--split test] [--step N] [--config.model.mem_len=256]

Held-out documents are streamed in a fixed order, one per row; memory is carried inside a
document and reset between documents. The memory length may differ from training's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import jax
import numpy as np

from memtx import state as state_lib
from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, UsageError, parse_int_list, resolve_config, run_cli
from memtx.config import Config
from memtx.data import DocumentStream, check_vocab_fits, open_source
from memtx.data.sources import SourceFn
from memtx.distributed import initialize_from_env, is_main_process, main_print
from memtx.metrics import Progress, format_duration
from memtx.step import make_eval_step


def stream_documents(setup: state_lib.Setup, params, source_fn: SourceFn, step_fn, *, log_every: int = 50,
                     verbose: bool = True, label: str = "") -> dict:
    """Streams the documents of `source_fn(process_index, process_count)` (an evaluation source:
    every document once, in a fixed order), one per row, memory carried inside a document and
    reset between documents, through `step_fn(params, memory, batch) -> (memory, sums)`; returns
    the sums added over all segments as float64 numpy values, with "documents" (how many were
    read) and "skipped_documents". Evaluation and the studies share it."""
    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    rows = B // jax.process_count()
    source = source_fn(jax.process_index(), jax.process_count())
    stream = DocumentStream(source, rows, N)
    memory = state_lib.init_memory_sharded(setup, B)
    segments = 0
    progress = Progress(source.num_docs or 0, unit="documents")
    sums, pending = {}, []

    def accumulate():
        for step_sums in jax.device_get(pending):
            for key, value in step_sums.items():
                sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
        pending.clear()

    while True:
        # Multi-host: every process steps until all are done (their shards may differ in length).
        batch = stream.next_batch()
        any_left = batch is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            any_left = bool(multihost_utils.process_allgather(np.array(any_left)).any())
        if not any_left:
            break
        batch = idle_batch(rows, N, source.vocab.pad_id) if batch is None else batch
        memory, step_sums = step_fn(params, memory, state_lib.device_batch(setup, batch))
        pending.append(step_sums)
        segments += 1
        if segments % log_every == 0:
            n_new = len(pending)
            accumulate()
            if verbose:
                progress.report(stream.documents_started, n_new * B * N, label)
    accumulate()
    counts = np.array([stream.documents_started, stream.skipped], np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(counts).sum(axis=0)
    sums["documents"], sums["skipped_documents"] = counts
    return sums


def evaluate(setup: state_lib.Setup, params, source_fn: SourceFn, *, log_every: int = 50,
             verbose: bool = True) -> dict:
    """Streams `source_fn`'s documents through the model; returns NLL sum, token count,
    perplexity and bits per byte (byte vocabulary) or per token."""
    cfg = setup.cfg
    t0 = time.perf_counter()
    sums = stream_documents(setup, params, source_fn, make_eval_step(setup), log_every=log_every, verbose=verbose)
    seconds = time.perf_counter() - t0
    nll_sum, tokens = float(sums.get("nll", 0.0)), float(sums.get("tokens", 0.0))
    result = {"nll_sum": nll_sum, "tokens": int(tokens), "documents": int(sums["documents"]),
              "skipped_documents": int(sums["skipped_documents"]),
              "perplexity": math.exp(nll_sum / max(tokens, 1)),
              "bits_per_token": nll_sum / (math.log(2) * max(tokens, 1)),
              # with the byte vocabulary a token is a byte (BOS is an input, never a target)
              "bits_per_byte": nll_sum / (math.log(2) * max(tokens, 1)) if cfg.data.vocab == "byte" else None,
              "vocab": cfg.data.vocab, "seconds": seconds}
    if cfg.model.knn.enabled and cfg.model.knn.size:
        result["knn_fill"] = float(sums["fill_sum"]) / max(tokens, 1)
        result["knn_top1_score"] = float(sums["top1_sum"]) / max(float(sums["top1_count"]), 1)
        result["knn_gate"] = {str(layer): jax.nn.sigmoid(params[f"layer_{layer}"]["attn"]["gate_bias"]).tolist()
                              for layer in cfg.model.knn.layer_indices(cfg.model.num_layers)}
    return result


def idle_batch(rows: int, seq_len: int, pad_id: int) -> dict:
    return {"inputs": np.full((rows, seq_len), pad_id, np.int32), "targets": np.full((rows, seq_len), pad_id, np.int32),
            "weights": np.zeros((rows, seq_len), np.float32), "reset": np.zeros((rows,), bool)}


def format_table(rows: list[dict]) -> str:
    header = ["run", "split", "memory", "kNN memory", "segment", "documents", "tokens", "perplexity", "bits/byte",
              "kNN fill", "top-1 score", "wall time"]
    memory = lambda r: f"{'LaMemo' if r.get('memory_type') == 'lamemo' else 'XL'} {r['mem_len']}" if r["mem_len"] else "none"
    lines = [[r["run"], r["split"], memory(r), str(r["knn_size"]) if r["knn_size"] is not None else "-",
              str(r["seq_len"]), str(r["documents"]), f"{r['tokens']:,}", f"{r['perplexity']:.3f}",
              f"{r['bits_per_byte']:.4f}" if r.get("bits_per_byte") is not None else "-", f"{r['knn_fill']:.1%}" if "knn_fill" in r else "-",
              f"{r['knn_top1_score']:.3f}" if "knn_top1_score" in r else "-", format_duration(r["seconds"])]
             for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def plot_memory_scaling(rows: list[dict], path: str, title: str) -> bool:
    """Perplexity against kNN memory size, a curve per kNN run (log axis); kNN size 0 and runs
    without a kNN layer are horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for index, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        color = f"C{index % 10}"
        sized = sorted((r["knn_size"], r["perplexity"]) for r in mine if r["knn_size"])
        if sized:
            ax.plot([s for s, _ in sized], [p for _, p in sized], "o-", color=color, label=f"{run}: kNN memory")
            ax.set_xscale("log", base=2)
            ax.set_xticks([s for s, _ in sized], [f"{s / 1024:g}K" if s >= 1024 else str(s) for s, _ in sized])
            ax.minorticks_off()
        for r in mine:
            if r["knn_size"] == 0:
                ax.axhline(r["perplexity"], ls="--", color=color, label=f"{run}: kNN memory 0")
            elif r["knn_size"] is None:
                ax.axhline(r["perplexity"], ls=":", color=color, label=f"{run} (no kNN layer)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("kNN memory size (entries per row and head)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def evaluate_run(workdir: str, args: argparse.Namespace, rest: list[str], sizes: list[int] | None) -> list[dict]:
    """Evaluates one work directory's checkpoint, at each kNN memory size if it has a kNN memory."""
    if not os.path.isdir(workdir):
        raise UsageError(f"work directory '{workdir}' does not exist")
    cfg: Config = resolve_config(args.config, workdir, rest)
    if args.split:
        cfg.data.eval_split = args.split
    setups = []
    for size in sizes if sizes and cfg.model.knn.enabled else [None]:
        c = copy.deepcopy(cfg)
        if size is not None:
            c.model.knn.size = size
        setups.append(state_lib.build(c))  # validates every size (k <= size, bytes that fit) first
    ckpt = run_checkpointer(cfg, workdir, async_save=False)
    step = args.step if args.step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise UsageError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}")
    params = ckpt.restore_params(step, setups[0].abstract_state["params"])  # the same for every size
    source_fn = lambda shard_index, num_shards: open_source(  # noqa: E731
        cfg.data, cfg.data.eval_split, train=False, max_docs=cfg.data.eval_max_docs, shard_index=shard_index,
        num_shards=num_shards)
    probe = source_fn(0, 1)  # one-line errors (missing data, vocabulary too large) before any compilation
    check_vocab_fits(probe.vocab, cfg.model.vocab_size)
    where = f"{cfg.data.task} task" if cfg.data.task else f"corpus {cfg.data.corpus}"
    rows = []
    for setup in setups:
        m = setup.cfg.model
        knn_size = m.knn.size if m.knn.enabled else None
        main_print(f"{workdir}: evaluating step {step} on {probe.num_docs or 'all'} {cfg.data.eval_split} documents of the {where}, "
              f"{'LaMemo' if m.memory_type == 'lamemo' else 'XL'} memory {m.mem_len}, kNN memory {knn_size if knn_size is not None else 'none'}, segment {cfg.data.seq_len}",
              flush=True)
        result = evaluate(setup, params, source_fn, verbose=is_main_process())
        result.update(run=os.path.basename(os.path.normpath(workdir)), split=cfg.data.eval_split, mem_len=m.mem_len,
                      memory_type=m.memory_type,
                      knn_size=knn_size, seq_len=cfg.data.seq_len, step=step)
        name = f"eval_{cfg.data.eval_split}_mem{m.mem_len}" + (f"_knn{knn_size}" if knn_size is not None else "")
        if is_main_process():
            with open(os.path.join(workdir, f"{name}_step{step}.json"), "w") as f:
                json.dump(result, f, indent=2)
        rows.append(result)
    return rows


def main(args: argparse.Namespace, rest: list[str]) -> int:
    initialize_from_env()  # several processes: before JAX touches a device
    sizes = parse_int_list("--knn-sizes", args.knn_sizes) if args.knn_sizes else None
    rows = [row for workdir in args.workdir for row in evaluate_run(workdir, args, rest, sizes)]
    if sizes and not any(r["knn_size"] is not None for r in rows):
        raise UsageError("--knn-sizes needs a run with a kNN memory (model.knn.enabled)")
    if not is_main_process():
        return 0
    print(format_table(rows))
    gates_by_run = {r["run"]: r["knn_gate"] for r in rows if r.get("knn_gate")}  # parameters: one per run
    for run, gates in gates_by_run.items():
        for layer, per_head in gates.items():
            print(f"{run}: kNN gate per head, layer {layer}: " + " ".join(f"{g:.2f}" for g in per_head))
    if len(rows) > 1 and sizes:
        out = args.workdir[-1]
        plot = os.path.join(out, f"memory_scaling_{rows[0]['split']}_step{rows[-1]['step']}.png")
        if plot_memory_scaling(rows, plot, f"{rows[0]['split']} perplexity against kNN memory size"):
            print(f"plot written to {plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, nargs="+",
                   help="training work directories (config.json, checkpoints/); several runs share one table")
    p.add_argument("--config", help="a config file instead of WORKDIR/config.json")
    p.add_argument("--split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--step", type=int, help="checkpoint step; default: the latest")
    p.add_argument("--knn-sizes", help="comma-separated kNN memory sizes, e.g. 0,1536,8192,65536: one checkpoint "
                                       "evaluated at each, a table and a PNG plot of perplexity against size")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
