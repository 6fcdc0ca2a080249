"""What the studies share: the command line, loading a run's checkpoint, a jitted per-segment
reduction to stream documents through (with memtx.evaluation.stream_documents), and writing the
table, JSON and plot."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, Number, UsageError, check_output_dir, resolve_config
from memtx.config import Config, config_hash, stable_hash
from memtx.data import open_source
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.sources import SourceFn
from memtx.memory import model_memory
from memtx.model import segment_nll
from memtx.state import Setup
from memtx.step import jit_segment

DEFAULT_OUT = os.path.join("runs", "studies")


def parser(doc: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, nargs="+", help="training work directories (config.json, checkpoints/)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where the JSON and PNG go (default: {DEFAULT_OUT})")
    p.add_argument("--split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--step", type=Number(int, ge=0), help="checkpoint step; default: the latest")
    p.epilog = ("Documents as memtx.evaluate reads them: --config.data.eval_max_docs=N (0: all), "
                "--config.data.eval_doc_tokens=T, and any other --config.KEY=VALUE override.")
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

    def documents(self) -> SourceFn:
        """The split's documents (at most data.eval_max_docs; 0: all), per process."""
        return lambda shard_index, num_shards: open_source(self.cfg.data, self.split, train=False,
                                                           max_docs=self.cfg.data.eval_max_docs,
                                                           shard_index=shard_index, num_shards=num_shards)


def find_runs(args: argparse.Namespace, rest: list[str]) -> list[Run]:
    """Each work directory's config (+ `--config.X=V` overrides) and checkpoint step, checked
    before anything is compiled."""
    check_output_dir(args.out, "--out")  # before anything is computed
    runs = []
    for workdir in args.workdir:
        if not os.path.isdir(workdir):
            raise UsageError(f"work directory '{workdir}' does not exist")
        cfg = resolve_config(None, workdir, rest)
        ckpt = run_checkpointer(cfg, workdir, async_save=False)
        step = ckpt.step_to_read(args.step)  # a named step: it must exist and be undamaged
        runs.append(Run(os.path.basename(os.path.normpath(workdir)), workdir, cfg, step,
                        args.split or cfg.data.eval_split))
    names = [r.name for r in runs]
    for r in runs:  # same directory name in two places: name them by their paths
        if names.count(r.name) > 1:
            r.name = os.path.normpath(r.workdir)
    return runs


def provenance(runs: list[Run], overrides: list[str], **study_args) -> dict:
    """What a study's numbers depend on: per run its work directory, checkpoint step, corpus
    fingerprint, split, document limits and a hash of the resolved config; the overrides and the
    study's own arguments. Recorded in the JSON; its hash names the output files."""
    per_run = {}
    for r in runs:
        per_run[r.name] = {"workdir": os.path.abspath(r.workdir), "step": r.step, "split": r.split,
                           "corpus": corpus_fingerprint(r.cfg.data), "max_docs": r.cfg.data.eval_max_docs,
                           "doc_tokens": r.cfg.data.eval_doc_tokens,
                           "config_sha256": config_hash(r.cfg)}
    return to_json({"runs": per_run, "overrides": list(overrides), **study_args})


def output_stem(base: str, prov: dict) -> str:
    """BASE_HASH: a study rerun over other checkpoints, documents or settings never overwrites
    another's files; the same study over the same inputs writes the same names."""
    return f"{base}_{stable_hash(prov)}"


def title_note(prov: dict, documents: int | None = None) -> str:
    """'step 1000, corpus stdlib 1a2b3c4d, 12 documents' for plot titles (steps and corpora
    joined when the runs differ)."""
    runs = list(prov["runs"].values())
    steps = sorted({r["step"] for r in runs})
    corpora = sorted({f"{r['corpus'].get('corpus') or r['corpus'].get('task')} {(r['corpus'].get('sha256') or '')[:8]}".strip()
                      for r in runs})
    docs = f", {documents:,} documents" if documents else \
        (f", first {runs[0]['max_docs']:,} documents" if runs[0]["max_docs"] else "")
    return f"step {'/'.join(map(str, steps))}, {' + '.join(corpora)}{docs}"


def make_segment_step(setup: Setup, reduce: Callable):
    """Jitted (params, memory, batch) -> (new memory, sums) with
    sums = reduce(memory after the rows' resets, batch, the layers' sown intermediates):
    small per-segment reductions, never the full attention tensors."""
    model = setup.model

    def segment_step(params, memory, batch):
        memory_in = model_memory.reset_rows(memory, batch["reset"])  # what the layers read
        _, memory, inter = segment_nll(model, params, memory, batch, with_intermediates=True)
        return memory, reduce(memory_in, batch, inter)

    return jit_segment(setup, segment_step)


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


def report(study: str, args: argparse.Namespace, rest: list[str], runs: list[Run], study_run, format_table, plot) -> int:
    """A study's result over `runs` (`study_run(run)` each, with the provenance), its table
    printed, its JSON and plot written to --out."""
    prov = provenance(runs, rest)
    result = {"study": study, "split": runs[0].split, "provenance": prov, "runs": {r.name: study_run(r) for r in runs}}
    print(format_table(result))
    write_outputs(args.out, output_stem(f"{study}_{result['split']}", prov), result, lambda path: plot(result, path))
    return 0
