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
import math
import os
import sys

from memtx import cache_tuning, compilation_cache
from memtx.cli import ArgumentParser, Number, UsageError, parse_int_list, run_cli, run_config
from memtx.config import stable_hash
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.fingerprint import describe as describe_fingerprint
from memtx.distributed import initialize_from_env, is_main_process, main_print
from memtx.evaluation import cache_paired_rows, default_far_reach, evaluate_workdir, paired_rows, run_names
from memtx.loss_breakdown import COPY_BUCKETS, DEFAULT_FAR_REACH, DEFAULT_NGRAM, POSITION_BUCKETS
from memtx.memory import registry
from memtx.memory.output_cache import CacheSpec
from memtx.metrics import format_duration, markdown_table
from memtx.studies.common import pyplot


def _knn(r: dict) -> str:
    return str(r["knn_size"]) if r.get("knn_size") is not None else "-"


def _cache(r: dict) -> str:
    """The output cache of a result: "continuous 1024 (theta 16, lambda 0.3, fill 16)" or "-"."""
    c = r.get("cache")
    if not c:
        return "-"
    if c.get("gate"):
        return f"{c['scorer']} {c['size']}" + (f" top {c['k']}" if c["k"] else "") + f" (theta {c['theta']:g}, learned gate)"
    return (f"{c['scorer']} {c['size']}" + (f" top {c['k']}" if c["k"] else "")
            + f" (theta {c['theta']:g}, lambda {c['lam']:g}" + (f", fill {c['fill']:g}" if c["fill"] else "") + ")")


def format_cache_fits(rows: list[dict]) -> str:
    """What each output cache was fitted on, and its tuning-set perplexity with and without it."""
    header = ["run", "fitted on", "tokens", "perplexity without", "with the cache", "best fixed lambda", "grid edge",
              "learned gate", "reported: first 64 positions' NLL without / with"]
    lines, seen = [], set()
    for r in rows:
        fit = (r.get("cache") or {}).get("fit")
        if not fit or (r["run_base"], r.get("knn_size"), r["cache_size"]) in seen:
            continue
        seen.add((r["run_base"], r.get("knn_size"), r["cache_size"]))
        on = fit["tuned_on"]
        fixed = fit["fixed_lambda"]
        lines.append([r["run_base"] + f" +cache {r['cache_size']}", f"{on['split']} documents {on['documents'][0]}-{on['documents'][1] - 1}",
                      f"{on['tokens']:,}", f"{fit['model_perplexity']:.3f}", f"{fit['perplexity']:.3f}",
                      f"theta {fixed['theta']:g} lambda {fixed['lam']:g}: {math.exp(fixed['nll']):.3f}",
                      ", ".join(fit["at_grid_edge"]) or "-",
                      f"{math.exp(fit['gate']['nll']):.3f}" if fit.get("gate") else "-",
                      (lambda e: f"{e['model_nll']:.4f} / {e['nll']:.4f}")(r["first_64_positions"])
                      if r.get("first_64_positions") else "-"])
    return ("output cache settings, fitted on tuning documents that are not the reported ones:\n"
            + markdown_table(header, lines)) if lines else ""


def _memory_label(result: dict) -> str:
    """The memory kind of a result (results written before the rename say "memory_type")."""
    name = result.get("memory", result.get("memory_type", "xl"))
    return registry.KINDS[name].label if name in registry.KINDS else name


def format_table(rows: list[dict]) -> str:
    header = ["run", "split", "memory", "kNN memory", "output cache", "segment", "documents", "tokens",
              "perplexity [95% CI]", "bits/byte", "kNN fill", "top-1 score", "wall time"]
    memory = lambda r: f"{_memory_label(r)} {r['mem_len']}" if r["mem_len"] else "none"  # noqa: E731
    ci = lambda r: f" [{r['perplexity_ci95'][0]:.3f}, {r['perplexity_ci95'][1]:.3f}]" if r.get("perplexity_ci95") else ""  # noqa: E731
    lines = [[r["run"], r["split"], memory(r), _knn(r), _cache(r), str(r["seq_len"]), str(r["documents"]), f"{r['tokens']:,}",
              f"{r['perplexity']:.3f}{ci(r)}",
              f"{r['bits_per_byte']:.4f}" if r.get("bits_per_byte") is not None else "-", f"{r['knn_fill']:.1%}" if "knn_fill" in r else "-",
              f"{r['knn_top1_score']:.3f}" if "knn_top1_score" in r else "-", format_duration(r["seconds"])]
             for r in rows]
    return markdown_table(header, lines)


def format_paired(rows: list[dict], paired: list[dict], cache: bool = False) -> str:
    """Each row's paired difference to the first (`cache`: each cache row's to its run without one)."""
    base = rows[0]
    name = base["run"] + (f" (kNN {base['knn_size']})" if base.get("knn_size") is not None else "")
    done = next((p for p in paired if "not_paired" not in p), None)
    if cache:
        title = ("each output cache against its run without it: perplexity minus the run's own on the same "
                 + (f"{done['documents']} documents, 95% intervals from {done['resamples']:,} joint document resamples"
                    if done else "documents"))
    else:
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
    plt = pyplot()
    if plt is None:
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


def plot_cache_scaling(rows: list[dict], path: str) -> bool:
    """Perplexity against output-cache size (0: none), a line per run, with each point's bootstrap
    interval."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    runs = list(dict.fromkeys((r["run_base"], r.get("knn_size"), r.get("cache_mixture")) for r in rows
                              if r.get("cache_size")))
    sizes = sorted({r.get("cache_size") or 0 for r in rows})
    for index, (run, knn, mixture) in enumerate(runs):
        mine = sorted((r for r in rows if r["run_base"] == run and r.get("knn_size") == knn
                       and (not r.get("cache_size") or r.get("cache_mixture") == mixture)),
                      key=lambda r: r.get("cache_size") or 0)
        x = [sizes.index(r.get("cache_size") or 0) for r in mine]
        y = [r["perplexity"] for r in mine]
        err = [[p - (r.get("perplexity_ci95") or [p, p])[0] for p, r in zip(y, mine)],
               [(r.get("perplexity_ci95") or [p, p])[1] - p for p, r in zip(y, mine)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=f"C{index % 10}",
                    label=run + (f" (kNN {knn})" if knn is not None else "") + (f", {mixture}" if mixture not in (None, "fill") else ""))
    ax.set_xticks(range(len(sizes)), [str(s) if s else "none" for s in sizes])
    ax.set(xlabel="output cache size (entries per document)", ylabel="perplexity (95% bootstrap interval)",
           title=f"{rows[0]['split']} perplexity with the output cache ({rows[-1].get('documents', '?')} documents)")
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
    cache_sizes = parse_int_list("--cache-sizes", args.cache_sizes) if args.cache_sizes is not None else []
    mixtures = cache_tuning.parse_mixtures(args.cache_mixtures)
    cache = None
    if cache_sizes:
        try:
            cache = CacheSpec(size=1, scorer=args.cache_scorer, k=args.cache_k if args.cache_k is not None else
                              (32 if args.cache_scorer == "knn_lm" else 0), normalize=not args.cache_raw,
                              backend=args.cache_backend)
        except ValueError as e:
            raise UsageError(f"--cache-*: {e}")
    elif args.cache_fit:
        raise UsageError("--cache-fit needs --cache-sizes")
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
                                        far_reach=far_reach, copy_ngram=args.copy_ngram, name=name, overrides=rest,
                                        cache_sizes=cache_sizes, cache=cache, cache_tune_docs=args.cache_tune_docs,
                                        cache_fit=args.cache_fit, cache_mixtures=mixtures)]
    if not is_main_process():
        return 0
    print(format_table(rows))
    gates_by_run = {r["run"]: r["knn_gate"] for r in rows if r.get("knn_gate")}  # parameters: one per run
    for run, gates in gates_by_run.items():
        for layer, per_head in gates.items():
            print(f"{run}: kNN gate per head, layer {layer}: " + " ".join(f"{g:.2f}" for g in per_head))
    if len(rows) > 1:
        print(format_paired(rows, paired_rows(rows)))
    if any(r.get("cache_size") for r in rows):
        print(format_cache_fits(rows))
        if len(args.workdir) > 1 or len({r.get("knn_size") for r in rows}) > 1:  # else the table above says it
            print(format_paired(rows, cache_paired_rows(rows), cache=True))
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
    if any(r.get("cache_size") for r in rows):
        out = args.workdir[-1]
        plot = os.path.join(out, f"cache_scaling_{rows[0]['split']}_step{rows[-1]['step']}_"
                                 f"{stable_hash([r['identity'] for r in rows])}.png")
        if plot_cache_scaling(rows, plot):
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
    p.add_argument("--step", type=Number(int, ge=0), help="checkpoint step; default: the latest")
    p.add_argument("--knn-sizes", help="comma-separated kNN memory sizes, e.g. 0,1536,8192,65536: one checkpoint "
                                       "evaluated at each, a table and a PNG plot of perplexity against size")
    p.add_argument("--cache-sizes", help="comma-separated output-cache sizes, e.g. 0,256,1024,3072: a row each "
                                         "with the test-time cache of the model's output states mixed in "
                                         "(continuous cache or kNN-LM), fitted on --cache-tune-docs other documents")
    p.add_argument("--cache-scorer", choices=["continuous", "knn_lm"], default="continuous",
                   help="continuous: exp(theta h_t.h_i) over the whole cache (Grave et al. 2017); knn_lm: the k "
                        "nearest, softmax of -distance/T (Khandelwal et al. 2020)")
    p.add_argument("--cache-k", type=Number(int, ge=0), help="entries each position reads: 0 = all (continuous default); "
                                               "knn_lm default 32")
    p.add_argument("--cache-raw", action="store_true", help="h as it is, not scaled to unit length")
    p.add_argument("--cache-backend", default="auto", help="the kNN store's search backend for k > 0")
    p.add_argument("--cache-tune-docs", type=Number(int, ge=1), default=32,
                   help="fit theta, lambda and fill on this many documents of the split after the reported "
                        "data.eval_max_docs (default 32); the fit is saved as WORKDIR/cache_fit_*.json")
    p.add_argument("--cache-fit", help="a saved cache_fit_*.json to use instead of fitting")
    p.add_argument("--cache-mixtures", default="fill",
                   help="how the cache's weight is set, a row each (comma-separated): fill (lambda * n / (n + fill), "
                        "the grid's best), fixed (the best fixed lambda), gate (a logistic gate from h, the fill and "
                        "the best match, fitted on the tuning documents)")
    p.add_argument("--copy-ngram", type=Number(int, ge=1), default=DEFAULT_NGRAM,
                   help=f"tokens before a target that make its copyability n-gram (default {DEFAULT_NGRAM})")
    p.add_argument("--far-reach", type=Number(int, ge=1), help="a target whose n-gram last occurred further back than the local "
                                                 "window but at most this many tokens back is `far`; default: the "
                                                 f"largest kNN memory size evaluated, or {DEFAULT_FAR_REACH}")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
