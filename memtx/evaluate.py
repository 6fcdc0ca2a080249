"""Long-document evaluation of a checkpoint: perplexity and bits per byte, with a bootstrap interval
over documents, paired differences between runs, and the loss by position and copyability.

    python -m memtx.evaluate --workdir runs/txl_cpu [runs/knn_cpu ...] [--split test] [--step N]
        [--knn-sizes 0,256,4096] [--copy-ngram 8] [--far-reach 4096] [--config.model.mem_len=256]

Held-out documents are streamed in a fixed order, one per row; memory is carried inside a
document and reset between documents. The memory length may differ from training's.

Perplexity is printed with its 95% percentile-bootstrap interval over documents. With several
work directories, a second table gives each later row's perplexity minus the FIRST row's on the
same documents (resampled jointly), in absolute and relative terms with 95% intervals: "within
noise" when the interval covers 0, else "better" (lower) or "worse". A third table gives the mean
NLL (nats/token) by the target's position in its document and by copyability: whether the n-gram
before the target (--copy-ngram tokens) occurred earlier in the document within the first run's
local window (segment + memory length: `local`), further back but within --far-reach tokens
(`far`), or not (`never`). Each result goes to WORKDIR/eval_SPLIT_CORPUSHASH[_maxN]_memM[_knnK]_stepS.json
with per-document NLL sums (`documents_nll`) and the corpus fingerprint.
"""

from __future__ import annotations

import argparse
import os
import sys

from memtx import compilation_cache
from memtx.cli import ArgumentParser, UsageError, parse_int_list, run_cli
from memtx.config import stable_hash
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.fingerprint import describe as describe_fingerprint
from memtx.distributed import initialize_from_env, is_main_process, main_print
from memtx.evaluation import default_far_reach, evaluate_workdir, paired_rows, run_config, run_names
from memtx.loss_breakdown import COPY_BUCKETS, DEFAULT_FAR_REACH, DEFAULT_NGRAM, POSITION_BUCKETS
from memtx.memory import registry
from memtx.metrics import format_duration, markdown_table


def _knn(r: dict) -> str:
    return str(r["knn_size"]) if r.get("knn_size") is not None else "-"


def _memory_label(result: dict) -> str:
    """The memory kind of a result (results written before the rename say "memory_type")."""
    name = result.get("memory", result.get("memory_type", "xl"))
    return registry.KINDS[name].label if name in registry.KINDS else name


def format_table(rows: list[dict]) -> str:
    header = ["run", "split", "memory", "kNN memory", "segment", "documents", "tokens", "perplexity [95% CI]",
              "bits/byte", "kNN fill", "top-1 score", "wall time"]
    memory = lambda r: f"{_memory_label(r)} {r['mem_len']}" if r["mem_len"] else "none"  # noqa: E731
    ci = lambda r: f" [{r['perplexity_ci95'][0]:.3f}, {r['perplexity_ci95'][1]:.3f}]" if r.get("perplexity_ci95") else ""  # noqa: E731
    lines = [[r["run"], r["split"], memory(r), _knn(r), str(r["seq_len"]), str(r["documents"]), f"{r['tokens']:,}",
              f"{r['perplexity']:.3f}{ci(r)}",
              f"{r['bits_per_byte']:.4f}" if r.get("bits_per_byte") is not None else "-", f"{r['knn_fill']:.1%}" if "knn_fill" in r else "-",
              f"{r['knn_top1_score']:.3f}" if "knn_top1_score" in r else "-", format_duration(r["seconds"])]
             for r in rows]
    return markdown_table(header, lines)


def format_paired(rows: list[dict], paired: list[dict]) -> str:
    base = rows[0]
    name = base["run"] + (f" (kNN {base['knn_size']})" if base.get("knn_size") is not None else "")
    done = next((p for p in paired if "not_paired" not in p), None)
    title = (f"paired with {name}: each row's perplexity minus {name}'s on the same {done['documents']} documents, "
             f"95% intervals from {done['resamples']:,} joint document resamples" if done else f"paired with {name}:")
    lines = [[p["run"], _knn(p), *([f"{p['b']:.3f}", f"{p['diff']:+.3f}", f"[{p['diff_ci'][0]:+.3f}, {p['diff_ci'][1]:+.3f}]",
                                    f"{p['rel_pct']:+.2f}%", f"[{p['rel_pct_ci'][0]:+.2f}%, {p['rel_pct_ci'][1]:+.2f}%]",
                                    p["verdict"]] if "not_paired" not in p else ["-"] * 5 + [f"not paired: {p['not_paired']}"])]
             for p in paired]
    return title + "\n" + markdown_table(["run", "kNN memory", "perplexity", "difference", "95% interval", "relative",
                                          "95% interval", "verdict"], lines)


def format_breakdown(rows: list[dict]) -> str:
    """Mean NLL (nats/token) by target position and by copyability, with the token counts."""
    c = rows[0]["copyability"]
    buckets = [("loss_by_position", b) for b in POSITION_BUCKETS] + [("loss_by_copyability", b) for b in COPY_BUCKETS]
    nll = lambda r: [f"{r[k][b]['nll']:.4f}" if r[k][b]["nll"] is not None else "-" for k, b in buckets]  # noqa: E731
    count = lambda r: [f"{r[k][b]['tokens']:,}" for k, b in buckets]  # noqa: E731
    same = all(count(r) == count(rows[0]) for r in rows)
    lines = []
    for r in rows:
        lines.append([r["run"], _knn(r), *nll(r)])
        if not same:
            lines.append(["  tokens", "", *count(r)])
    if same:
        lines.append(["tokens", "", *count(rows[0])])
    title = (f"mean NLL (nats/token) by target position, and by where the {c['ngram']}-gram before the target last "
             f"occurred in its document: within {c['local_window']} tokens (local: segment + memory of "
             f"{rows[0]['run']}), within {c['far_reach']:,} (far), or not (never)")
    return title + "\n" + markdown_table(["run", "kNN memory", "t<512", "512-2K", "2K-8K", ">=8K", "local", "far",
                                          "never"], lines)


def plot_memory_scaling(rows: list[dict], path: str, title: str) -> bool:
    """Perplexity (left) and the far-copyable tokens' loss (right) against kNN memory size, a curve
    per kNN run (log axis); kNN size 0 and runs without a kNN layer are horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    far = lambda r: (r.get("loss_by_copyability") or {}).get("far", {}).get("nll")  # noqa: E731
    panels = [("perplexity", lambda r: r["perplexity"], title)]
    if any(far(r) is not None for r in rows):
        panels.append(("mean NLL of far-copyable tokens (nats)", far,
                       f"far-copyable tokens ({rows[0]['copyability']['local_window']} < distance <= "
                       f"{rows[0]['copyability']['far_reach']})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for ax, (ylabel, value, panel_title) in zip(axes[0], panels):
        for index, run in enumerate(runs):
            mine = [r for r in rows if r["run"] == run and value(r) is not None]
            color = f"C{index % 10}"
            sized = sorted((r["knn_size"], value(r)) for r in mine if r["knn_size"])
            if sized:
                ax.plot([s for s, _ in sized], [p for _, p in sized], "o-", color=color, label=f"{run}: kNN memory")
                ax.set_xscale("log", base=2)
                ax.set_xticks([s for s, _ in sized], [f"{s / 1024:g}K" if s >= 1024 else str(s) for s, _ in sized])
                ax.minorticks_off()
            for r in mine:
                if r["knn_size"] == 0:
                    ax.axhline(value(r), ls="--", color=color, label=f"{run}: kNN memory 0")
                elif r["knn_size"] is None:
                    ax.axhline(value(r), ls=":", color=color, label=f"{run} (no kNN layer)")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel("kNN memory size (entries per row and head)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ running


def main(args: argparse.Namespace, rest: list[str]) -> int:
    initialize_from_env()  # several processes: before JAX touches a device
    sizes = parse_int_list("--knn-sizes", args.knn_sizes) if args.knn_sizes is not None else None
    if args.copy_ngram < 1:
        raise UsageError(f"--copy-ngram must be >= 1, got {args.copy_ngram}")
    if args.far_reach is not None and args.far_reach < 1:
        raise UsageError(f"--far-reach must be >= 1, got {args.far_reach}")
    cfgs = [run_config(workdir, args.config, rest, args.split) for workdir in args.workdir]
    for cfg in cfgs:  # the runs' own caches (the last one configured wins: JAX keeps one)
        compilation_cache.use(cfg.train.compilation_cache_dir)
    if args.corpus is not None:  # every document there: one split holding them all
        if args.split:
            raise UsageError("--corpus evaluates every document of PATH; it takes no --split")
        if not os.path.exists(os.path.expanduser(args.corpus)) and not any(ch in args.corpus for ch in "*?["):
            raise UsageError(f"--corpus '{args.corpus}' does not exist")
        for cfg in cfgs:
            cfg.data.corpus, cfg.data.task = args.corpus, ""
            cfg.data.split_fractions, cfg.data.eval_split = (1, 0, 0), "train"
    if sizes and not any(c.model.knn.enabled for c in cfgs):
        raise UsageError("--knn-sizes needs a run with a kNN memory (model.knn.enabled)")
    window = cfgs[0].data.seq_len + cfgs[0].model.mem_len  # the first run's: the same buckets for every run
    far_reach = args.far_reach or default_far_reach(cfgs, sizes)
    for line in dict.fromkeys(describe_fingerprint(corpus_fingerprint(c.data)) for c in cfgs):
        main_print(f"data: {line}", flush=True)
    rows = [row for workdir, cfg, name in zip(args.workdir, cfgs, run_names(args.workdir))
            for row in evaluate_workdir(workdir, cfg, step=args.step, knn_sizes=sizes, local_window=window,
                                        far_reach=far_reach, copy_ngram=args.copy_ngram, name=name, overrides=rest)]
    if not is_main_process():
        return 0
    print(format_table(rows))
    gates_by_run = {r["run"]: r["knn_gate"] for r in rows if r.get("knn_gate")}  # parameters: one per run
    for run, gates in gates_by_run.items():
        for layer, per_head in gates.items():
            print(f"{run}: kNN gate per head, layer {layer}: " + " ".join(f"{g:.2f}" for g in per_head))
    if len(rows) > 1:
        print(format_paired(rows, paired_rows(rows)))
    print(format_breakdown(rows))
    if len(rows) > 1 and sizes:
        out = args.workdir[-1]
        what = stable_hash([r["identity"] for r in rows])
        plot = os.path.join(out, f"memory_scaling_{rows[0]['split']}_step{rows[-1]['step']}_{what}.png")
        c = cfgs[-1].data
        where = c.task or os.path.basename(os.path.normpath(str(c.corpus))) or str(c.corpus)
        title = (f"{rows[0]['split']} perplexity against kNN memory size\n{where}, {rows[-1].get('documents', '?')} documents, "
                 f"step {rows[-1]['step']}")
        if plot_memory_scaling(rows, plot, title):
            print(f"plot written to {plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, nargs="+",
                   help="training work directories (config.json, checkpoints/); several runs share one table, "
                        "and each row after the first is paired with the first")
    p.add_argument("--config", help="a config file instead of WORKDIR/config.json")
    p.add_argument("--split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--corpus", help="evaluate every document of this directory, glob or file instead of the run's "
                                    "split (reported as split 'train' of that corpus, with its fingerprint)")
    p.add_argument("--step", type=int, help="checkpoint step; default: the latest")
    p.add_argument("--knn-sizes", help="comma-separated kNN memory sizes, e.g. 0,1536,8192,65536: one checkpoint "
                                       "evaluated at each, a table and a PNG plot of perplexity against size")
    p.add_argument("--copy-ngram", type=int, default=DEFAULT_NGRAM,
                   help=f"tokens before a target that make its copyability n-gram (default {DEFAULT_NGRAM})")
    p.add_argument("--far-reach", type=int, help="a target whose n-gram last occurred further back than the local "
                                                 "window but at most this many tokens back is `far`; default: the "
                                                 f"largest kNN memory size evaluated, or {DEFAULT_FAR_REACH}")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
