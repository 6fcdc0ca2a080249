"""What the studies share: the command line, loading a run's checkpoint, a jitted per-segment
reduction to stream documents through (with memtx.evaluate.stream_documents), and writing the
table, JSON and plot."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from memtx import sharding
from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, UsageError, resolve_config
from memtx.config import Config
from memtx.data import open_source
from memtx.data.sources import SourceFn
from memtx.memory import model_memory
from memtx.model import segment_nll
from memtx.state import Setup, batch_shardings, memory_shardings
from memtx.step import under_mesh

DEFAULT_OUT = os.path.join("runs", "studies")


def parser(doc: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, nargs="+", help="training work directories (config.json, checkpoints/)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where the JSON and PNG go (default: {DEFAULT_OUT})")
    p.add_argument("--split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--max-docs", type=int, help="at most this many documents; default: data.eval_max_docs (0: all)")
    p.add_argument("--step", type=int, help="checkpoint step; default: the latest")
    return p


@dataclass
class Run:
    name: str
    workdir: str
    cfg: Config
    step: int
    split: str

    def restore_params(self, setup: Setup):
        ckpt = run_checkpointer(self.cfg, self.workdir, async_save=False)
        return ckpt.restore_params(self.step, setup.abstract_state["params"])

    def documents(self, max_docs: int | None) -> SourceFn:
        """The split's documents (at most `max_docs`; None: data.eval_max_docs), per process."""
        limit = self.cfg.data.eval_max_docs if max_docs is None else max_docs
        return lambda shard_index, num_shards: open_source(self.cfg.data, self.split, train=False, max_docs=limit,
                                                           shard_index=shard_index, num_shards=num_shards)


def find_runs(args: argparse.Namespace, rest: list[str]) -> list[Run]:
    """Each work directory's config (+ `--config.X=V` overrides) and checkpoint step, checked
    before anything is compiled."""
    if args.max_docs is not None and args.max_docs < 0:
        raise UsageError(f"--max-docs must be >= 0, got {args.max_docs}")
    runs = []
    for workdir in args.workdir:
        if not os.path.isdir(workdir):
            raise UsageError(f"work directory '{workdir}' does not exist")
        cfg = resolve_config(None, workdir, rest)
        ckpt = run_checkpointer(cfg, workdir, async_save=False)
        step = args.step if args.step is not None else ckpt.latest_step()
        if step is None or step not in ckpt.all_steps():
            raise UsageError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}")
        runs.append(Run(os.path.basename(os.path.normpath(workdir)), workdir, cfg, step,
                        args.split or cfg.data.eval_split))
    names = [r.name for r in runs]
    for r in runs:  # same directory name in two places: name them by their paths
        if names.count(r.name) > 1:
            r.name = os.path.normpath(r.workdir)
    return runs


def make_segment_step(setup: Setup, reduce: Callable):
    """Jitted (params, memory, batch) -> (new memory, sums) with
    sums = reduce(memory after the rows' resets, batch, the layers' sown intermediates):
    small per-segment reductions, never the full attention tensors."""
    model = setup.model

    def segment_step(params, memory, batch):
        memory_in = model_memory.reset_rows(memory, batch["reset"])  # what the layers read
        _, memory, inter = segment_nll(model, params, memory, batch, with_intermediates=True)
        return memory, reduce(memory_in, batch, inter)

    jitted = jax.jit(segment_step, in_shardings=(setup.state_shardings["params"], memory_shardings(setup),
                                                 batch_shardings(setup)),
                     out_shardings=(memory_shardings(setup), sharding.replicated(setup.mesh)), donate_argnums=(1,))
    return under_mesh(setup, jitted)


def safe_mean(total, count):
    """total / count, NaN where count is 0."""
    total, count = np.asarray(total, np.float64), np.asarray(count, np.float64)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def to_json(x):
    """numpy arrays and NaNs -> JSON (NaN as null)."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (and a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    return plt


def write_outputs(out: str, stem: str, result: dict, plot: Callable[[str], bool]) -> None:
    """Writes OUT/STEM.json and (via `plot(path)`) OUT/STEM.png, and prints their paths."""
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(to_json(result), f, indent=2)
    print(f"numbers written to {json_path}")
    png_path = os.path.join(out, f"{stem}.png")
    if plot(png_path):
        print(f"plot written to {png_path}")
