"""Compare configs over seeds, on the same batches: is a difference signal or noise?

    python -m memtx.compare --out runs/compare --seeds 3 configs/txl.py:cpu configs/lamemo.py:cpu \\
        knn0=configs/knn.py:cpu@model.knn.size=0 [--last-steps 500] [--eval-max-docs 12] \\
        [--eval-split validation] [--config.train.steps=2500 ...]

Each config is trained with train.seed = 0..SEEDS-1 into OUT/LABEL/seed<S>/ (memtx.train in this
process; a finished run is skipped, an interrupted one resumes). data.seed is the same for every
run, so seed S of every config reads the same batches. Then, per config, mean ± std over seeds of
(a) the training loss averaged over the last K steps (--last-steps; from each run's metrics.jsonl:
while training stays within its first epoch these steps read documents no model has seen) and
(b) the perplexity of each seed's final checkpoint on the same evaluation documents
(memtx.evaluate; --eval-max-docs, default data.eval_max_docs). Each config after the first is
paired with the first seed by seed (config minus first): the mean difference with a 95%
t-interval over seeds, "within noise" when it covers 0, else "better" (lower) or "worse".
Everything goes to OUT/compare.json, with a plot in OUT/compare.png.

With --cache-size S every checkpoint is also evaluated with the output cache of S entries
(memtx/memory/output_cache.py, the continuous cache; its theta, lambda and fill fitted per
checkpoint on --cache-tune-docs documents after the reported ones), and a table gives each config
and seed with and without it: the paired difference on the same documents with its 95% bootstrap
interval, and per config the mean relative change over seeds with its t-interval.

A config is [LABEL=]FILE.py[:PRESET][@KEY=VALUE...]: overrides after @ apply to that config only
(e.g. configs/knn.py:cpu@model.knn.size=0@model.knn.k=8), --config.KEY=VALUE (with "=") to every
run. LABEL (the directory name) defaults to FILE_PRESET plus the overridden values. train.seed
is set by --seeds, and data.seed may not differ between configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

from memtx import compilation_cache, stats
from memtx.cli import ArgumentParser, Number, UsageError, check_output_dir, resolve_config, run_cli, run_config
from memtx.config import Config, load_json, parse_overrides, to_dict
from memtx.data.fingerprint import describe as describe_fingerprint
from memtx.workdir_files import read_metrics


@dataclass
class ConfigSpec:
    label: str
    file: str  # FILE.py[:PRESET]
    overrides: list[str]  # --config.KEY=VALUE for this config only


def parse_spec(text: str) -> ConfigSpec:
    """'[LABEL=]FILE.py[:PRESET][@KEY=VALUE...]' -> ConfigSpec; a one-line UsageError if malformed."""
    head, *pairs = text.split("@")
    label, _, file = head.rpartition("=")
    if not file:
        raise UsageError(f"config '{text}' names no config file (expected [LABEL=]FILE.py[:PRESET][@KEY=VALUE...])")
    overrides = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not key or not eq:
            raise UsageError(f"config '{text}': override '{pair}' is not KEY=VALUE")
        overrides.append(f"--config.{key}={value}")
    if not label:
        path, _, preset = file.partition(":")
        label = "_".join([os.path.splitext(os.path.basename(path))[0], *([preset] if preset else []),
                          *(f"{p.split('=')[0].split('.')[-1]}{p.split('=', 1)[1]}" for p in pairs)])
    if not re.fullmatch(r"[A-Za-z0-9._,+-]+", label) or label in (".", ".."):
        raise UsageError(f"config '{text}': label '{label}' must be a plain directory name (letters, digits, ._,+-)")
    return ConfigSpec(label, file, overrides)


def resolve(spec: ConfigSpec, common: list[str], seed: int) -> Config:
    return resolve_config(spec.file, None, [*common, *spec.overrides, f"--config.train.seed={seed}"])


def finished(cfg: Config, workdir: str) -> bool:
    """Whether `workdir` holds this exact config trained to its last step."""
    from memtx.checkpoint import run_checkpointer
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or to_dict(load_json(path)) != to_dict(cfg):
        return False
    ckpt = run_checkpointer(cfg, workdir, async_save=False)
    done = ckpt.latest_step() == cfg.train.steps
    ckpt.close()
    return done


def last_steps_loss(workdir: str, steps: int, k: int) -> float:
    """Mean training loss of steps steps-k+1 .. steps (metrics.jsonl)."""
    losses = {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}  # not the eval lines
    wanted = range(steps - k + 1, steps + 1)
    missing = [s for s in wanted if s not in losses]
    if missing:
        raise UsageError(f"{workdir}/metrics.jsonl lacks step {missing[0]} of the last {k}")
    return sum(losses[s] for s in wanted) / k


def check_args(args: argparse.Namespace, rest: list[str]) -> tuple[list[ConfigSpec], list[str]]:
    # --seeds, --last-steps, --cache-size, --cache-tune-docs, --eval-max-docs: their ranges are their types (Number)
    check_output_dir(args.out, "--out")
    from memtx.cache_tuning import parse_mixtures
    args.cache_mixtures = parse_mixtures(args.cache_mixtures)
    for arg in rest:
        if not (arg.startswith("--config.") and "=" in arg):
            raise UsageError(f"unrecognised argument '{arg}' (overrides for every run look like "
                             "--config.train.steps=1000)")
    specs = [parse_spec(text) for text in args.configs]
    labels = [s.label for s in specs]
    if len(set(labels)) < len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise UsageError(f"two configs are labelled '{dup}': name them LABEL=FILE...")
    for where, overrides in [("--config", rest), *((f"config '{s.label}'", s.overrides) for s in specs)]:
        for key, _ in parse_overrides(overrides):
            if key == "train.seed" or (key == "data.seed" and where != "--config"):
                raise UsageError(f"{where} sets {key}: train.seed is 0..SEEDS-1 in every config and data.seed "
                                 "is shared (set it for every run with --config.data.seed=N)")
    return specs, rest


def train_all(specs: list[ConfigSpec], common: list[str], args: argparse.Namespace) -> dict[str, list[Config]]:
    from memtx.state import build
    from memtx.train import train
    cfgs = {s.label: [resolve(s, common, seed) for seed in range(args.seeds)] for s in specs}
    for s in specs:
        build(cfgs[s.label][0])  # every config checked (keys, mesh, memory) before the first is trained
    first = cfgs[specs[0].label][0]
    for s in specs[1:]:
        other = cfgs[s.label][0]
        diff = [k for k, v in to_dict(first)["data"].items() if to_dict(other)["data"][k] != v]
        if diff:
            print(f"note: '{s.label}' differs from '{specs[0].label}' in data.{', data.'.join(diff)}: "
                  "its seeds do not read the same batches", flush=True)
        if args.last_steps is not None and args.last_steps > other.train.steps:
            raise UsageError(f"--last-steps {args.last_steps} is more than the {other.train.steps} steps of '{s.label}'")
    if args.last_steps is not None and args.last_steps > first.train.steps:
        raise UsageError(f"--last-steps {args.last_steps} is more than the {first.train.steps} steps of "
                         f"'{specs[0].label}'")
    for s in specs:
        for seed, cfg in enumerate(cfgs[s.label]):
            workdir = os.path.join(args.out, s.label, f"seed{seed}")
            if finished(cfg, workdir):
                print(f"{s.label} seed {seed}: finished ({cfg.train.steps} steps) in {workdir}", flush=True)
                continue
            print(f"{s.label} seed {seed}: training {cfg.train.steps} steps into {workdir}", flush=True)
            summary = train(cfg, workdir)
            if summary["end_step"] < cfg.train.steps:  # SIGTERM (preemption): saved; stop here, rerun resumes
                raise UsageError(f"{s.label} seed {seed} stopped at step {summary['end_step']} of {cfg.train.steps}; "
                                 "rerun the same command to resume")
    return cfgs


def evaluate_all(specs: list[ConfigSpec], cfgs: dict[str, list[Config]], args: argparse.Namespace) -> tuple[dict, dict]:
    """({label: [each seed's evaluation result]}, all on the same documents; with --cache-size,
    {label: [each seed's result with the output cache]}, else {})."""
    from memtx import evaluation as evaluate_lib
    from memtx.memory.output_cache import CacheSpec
    all_cfgs = [c for cs in cfgs.values() for c in cs]
    first = all_cfgs[0]
    window = first.data.seq_len + first.model.mem_len
    far_reach = evaluate_lib.default_far_reach(all_cfgs, None)
    results, cached = {}, {}
    cache = dict(cache_sizes=[args.cache_size], cache=CacheSpec(size=1), cache_tune_docs=args.cache_tune_docs,
                 cache_mixtures=args.cache_mixtures) if args.cache_size else {}
    for s in specs:
        results[s.label], cached[s.label] = [], []
        for seed in range(args.seeds):
            workdir = os.path.join(args.out, s.label, f"seed{seed}")
            cfg = run_config(workdir, split=args.eval_split)
            if args.eval_max_docs is not None:
                cfg.data.eval_max_docs = args.eval_max_docs
            row, *with_cache = evaluate_lib.evaluate_workdir(workdir, cfg, local_window=window, far_reach=far_reach,
                                                             reuse=True, name=f"{s.label}/seed{seed}", **cache)
            cached[s.label].append(with_cache)  # a row per mixture
            base = (results[specs[0].label] or results[s.label] or [row])[0]
            why = evaluate_lib.not_paired(base, row)
            if why:
                raise UsageError(f"{s.label} seed {seed} cannot be paired with {specs[0].label} seed 0: {why}")
            results[s.label].append(row)
    return results, (cached if args.cache_size else {})


def summarize_cache(evals: dict, cached: dict) -> list[dict]:
    """Per config and mixture: each seed's perplexity without and with the output cache, its paired
    difference on the same documents (bootstrap over documents), and the seeds' mean relative
    change; for each mixture after the first, "against": its perplexity minus the first mixture's,
    seed by seed (t-interval over seeds) and per seed on the same documents."""
    from memtx.evaluation import paired_rows
    out = []
    for label, per_seed in cached.items():
        first = [rows[0] for rows in per_seed]
        for index in range(len(per_seed[0])):
            mine = [rows[index] for rows in per_seed]
            out.append(_cache_summary(label, evals[label], mine))
            if index:
                out[-1]["against"] = {
                    "mixture": first[0].get("cache_mixture") or "fill",
                    "seeds": stats.paired_seed_difference([r["perplexity"] for r in first], [r["perplexity"] for r in mine]),
                    "per_seed": [{k: p[k] for k in ("diff", "diff_ci", "rel_pct", "rel_pct_ci", "verdict")}
                                 for p in (paired_rows([a, b])[0] for a, b in zip(first, mine))]}
    return out


def _cache_summary(label: str, bases: list[dict], rows: list[dict]) -> dict:
    """One config's seeds with one mixture of the cache, each against itself without it."""
    from memtx.evaluation import cache_paired_rows
    runs = []
    for seed, (base, row) in enumerate(zip(bases, rows)):
        paired, = cache_paired_rows([base, row])
        fit = row["cache"]
        runs.append({"seed": seed, "without": base["perplexity"], "with": row["perplexity"],
                     "diff": paired["diff"], "diff_ci": paired["diff_ci"], "rel_pct": paired["rel_pct"],
                     "rel_pct_ci": paired["rel_pct_ci"], "verdict": paired["verdict"],
                     "first_64": row.get("first_64_positions"),
                     "fit": {k: fit[k] for k in ("theta", "lam", "fill")} | ({"gate": True} if fit.get("gate") else {}),
                     "eval_json": row["json_path"]})
    return {"label": label, "size": rows[0]["cache_size"], "mixture": rows[0].get("cache_mixture") or "fill",
            "runs": runs, "rel_pct": stats.seed_summary([r["rel_pct"] for r in runs]),
            "every_seed_better": all(r["verdict"] == "better" for r in runs)}


def summarize(specs: list[ConfigSpec], cfgs: dict[str, list[Config]], evals: dict, args: argparse.Namespace,
              common: list[str], cached: dict | None = None) -> dict:
    configs = []
    for s in specs:
        steps = cfgs[s.label][0].train.steps
        k = args.last_steps or max(1, steps // 5)
        runs = [{"seed": seed, "workdir": os.path.join(args.out, s.label, f"seed{seed}"), "steps": steps,
                 "train_loss_last": last_steps_loss(os.path.join(args.out, s.label, f"seed{seed}"), steps, k),
                 "perplexity": r["perplexity"], "perplexity_ci95": r.get("perplexity_ci95"), "eval_json": r["json_path"]}
                for seed, r in enumerate(evals[s.label])]
        configs.append({"label": s.label, "config": s.file, "overrides": s.overrides, "last_steps": k, "runs": runs,
                        "train_loss": stats.seed_summary([r["train_loss_last"] for r in runs]),
                        "perplexity": stats.seed_summary([r["perplexity"] for r in runs])})
    base = configs[0]
    paired = []
    for c in configs[1:]:
        pa, pb = [r["perplexity"] for r in base["runs"]], [r["perplexity"] for r in c["runs"]]
        paired.append({"label": c["label"], "against": base["label"],
                       "train_loss": stats.paired_seed_difference([r["train_loss_last"] for r in base["runs"]],
                                                                   [r["train_loss_last"] for r in c["runs"]]),
                       "perplexity": stats.paired_seed_difference(pa, pb),
                       "perplexity_rel_pct": stats.paired_seed_difference([0.0] * len(pa),
                                                                          [100 * (b / a - 1) for a, b in zip(pa, pb)])})
    row = evals[specs[0].label][0]
    return {"out": args.out, "seeds": args.seeds, "data_seed": cfgs[specs[0].label][0].data.seed, "overrides": common,
            "eval": {"split": row["split"], "max_docs": row["identity"]["max_docs"], "documents": row["documents"],
                     "tokens": row["tokens"], "corpus": row["corpus"]},
            "configs": configs, "paired": paired, "output_cache": summarize_cache(evals, cached or {})}


def _pm(summary: dict, digits: int) -> str:
    return f"{summary['mean']:.{digits}f}" + (f" ± {summary['std']:.{digits}f}" if summary["std"] is not None else "")


def _ci(d: dict, digits: int, unit: str = "") -> str:
    return f"[{d['ci'][0]:+.{digits}f}{unit}, {d['ci'][1]:+.{digits}f}{unit}]" if d["ci"] else "-"


def format_report(result: dict) -> str:
    from memtx.metrics import markdown_table
    configs, ev = result["configs"], result["eval"]
    ks = sorted({c["last_steps"] for c in configs})
    lines = [f"{len(configs)} configs x {result['seeds']} seeds (train.seed 0..{result['seeds'] - 1}, data.seed "
             f"{result['data_seed']}: seed s of every config read the same batches); {ev['split']}: "
             f"{ev['documents']} documents, {ev['tokens']:,} tokens of the {describe_fingerprint(ev['corpus'])}"]
    lines.append(markdown_table(
        ["config", "seeds", f"train loss, last {'/'.join(map(str, ks))} steps", f"{ev['split']} perplexity",
         "perplexity per seed"],
        [[c["label"], str(len(c["runs"])), _pm(c["train_loss"], 4), _pm(c["perplexity"], 3),
          " ".join(f"{r['perplexity']:.3f}" for r in c["runs"])] for c in configs]))
    if result["paired"]:
        n = result["seeds"]
        lines.append(f"paired with {configs[0]['label']}, seed by seed (config minus {configs[0]['label']}): mean "
                     f"difference and its 95% t-interval over {n} seed{'s' if n > 1 else ''}")
        lines.append(markdown_table(
            ["config", "train loss diff", "95% interval", "verdict", "perplexity diff", "95% interval", "relative",
             "verdict"],
            [[p["label"], f"{p['train_loss']['mean']:+.4f}", _ci(p["train_loss"], 4), p["train_loss"]["verdict"],
              f"{p['perplexity']['mean']:+.3f}", _ci(p["perplexity"], 3),
              f"{p['perplexity_rel_pct']['mean']:+.2f}% {_ci(p['perplexity_rel_pct'], 2, '%')}",
              p["perplexity"]["verdict"]] for p in result["paired"]]))
    if result.get("output_cache"):
        lines.append(format_cache(result["output_cache"], ev))
    return "\n".join(lines)


def format_cache(cache: list[dict], ev: dict) -> str:
    """Every config (and mixture) and seed without and with the output cache, each's mean over
    seeds, and the mixtures against each other."""
    from memtx.metrics import markdown_table
    rows, against = [], []
    for c in cache:
        name = c["label"] + (f" ({c['mixture']})" if c["mixture"] != "fill" else "")
        for r in c["runs"]:
            first = r["first_64"]
            fitted = (f"learned gate, theta {r['fit']['theta']:g}" if r["fit"].get("gate") else
                      f"theta {r['fit']['theta']:g}, lambda {r['fit']['lam']:g}, fill {r['fit']['fill']:g}")
            rows.append([name, str(r["seed"]), f"{r['without']:.3f}", f"{r['with']:.3f}",
                         f"{r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]",
                         f"{r['rel_pct']:+.1f}% [{r['rel_pct_ci'][0]:+.1f}%, {r['rel_pct_ci'][1]:+.1f}%]", r["verdict"],
                         f"{first['model_nll']:.3f} / {first['nll']:.3f}" if first else "-", fitted])
        s = c["rel_pct"]
        rows.append([f"**{name}**", f"mean of {s['n']}", "", "", "",
                     f"{s['mean']:+.1f}%" + (f" [{s['ci'][0]:+.1f}%, {s['ci'][1]:+.1f}%]" if s["ci"] else ""),
                     "every seed better" if c["every_seed_better"] else "not every seed better", "", ""])
        if c.get("against"):
            a, d = c["against"], c["against"]["seeds"]
            against.append([name, a["mixture"], f"{d['mean']:+.3f}" + (f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else ""),
                            d["verdict"], " ".join(f"{p['rel_pct']:+.2f}% ({p['verdict']})" for p in a["per_seed"])])
    text = (f"the output cache ({cache[0]['size']} entries, continuous; fitted per checkpoint on other documents), "
            f"each checkpoint against itself without it on the same {ev['documents']} {ev['split']} documents "
            "(95% bootstrap intervals over documents; the mean's is a t-interval over seeds):\n"
            + markdown_table(["config", "seed", "perplexity without", "with the cache", "difference", "relative",
                              "verdict", "first 64 positions' NLL without / with", "fitted"], rows))
    if against:
        text += ("\nthe cache's weight compared: perplexity with one mixture minus with another, seed by seed "
                 "(t-interval over seeds), and per seed on the same documents (bootstrap):\n"
                 + markdown_table(["config (mixture)", "minus", "mean difference [95%]", "verdict over seeds",
                                   "per seed: relative (verdict)"], against))
    return text


def plot(result: dict, path: str) -> bool:
    """Per-seed values (dots) and the mean with its 95% t-interval, per config."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    configs = result["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(configs), 4))
    for ax, key, name in [(axes[0], "train_loss_last", "train_loss"), (axes[1], "perplexity", "perplexity")]:
        cache = {c["label"]: c for c in reversed(result.get("output_cache") or [])}  # each config's first mixture
        for i, c in enumerate(configs):
            ax.plot([i] * len(c["runs"]), [r[key] for r in c["runs"]], "o", color="C0", alpha=0.5,
                    label="seeds" if i == 0 else None)
            if name == "perplexity" and c["label"] in cache:
                ax.plot([i - 0.15] * len(c["runs"]), [r["with"] for r in cache[c["label"]]["runs"]], "v", color="C2",
                        alpha=0.7, label=f"seeds with the output cache ({cache[c['label']]['size']})" if i == 0 else None)
            s = c[name]
            err = [[s["mean"] - s["ci"][0]], [s["ci"][1] - s["mean"]]] if s["ci"] else None
            ax.errorbar([i + 0.15], [s["mean"]], yerr=err, fmt="s", color="C1", capsize=4)
        ax.set_xticks(range(len(configs)), [c["label"] for c in configs], rotation=20, ha="right")
        ax.set_ylabel(f"train loss (last {configs[0]['last_steps']} steps)" if name == "train_loss"
                      else f"{result['eval']['split']} perplexity")
        ax.grid(True, axis="y", alpha=0.3)
        if name == "perplexity" and result.get("output_cache"):
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['seeds']} seeds per config: seeds (dots), mean and 95% t-interval (squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _json(x):
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(args: argparse.Namespace, rest: list[str]) -> int:
    specs, common = check_args(args, rest)
    if args.cache_size:  # its tuning documents exist: a one-line error now, not after training
        from memtx.cache_tuning import tuning_documents
        first = resolve(specs[0], common, 0)
        max_docs = first.data.eval_max_docs if args.eval_max_docs is None else args.eval_max_docs
        tuning_documents(dataclasses.replace(first, data=dataclasses.replace(
            first.data, eval_max_docs=max_docs, eval_split=args.eval_split or first.data.eval_split)), args.cache_tune_docs)
    with compilation_cache.within(args.compilation_cache or os.path.join(args.out, "compilation_cache")):
        cfgs = train_all(specs, common, args)
        evals, cached = evaluate_all(specs, cfgs, args)
    result = summarize(specs, cfgs, evals, args, common, cached)
    print(format_report(result))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compare.json")
    with open(path, "w") as f:
        json.dump(_json(result), f, indent=2)
    print(f"numbers written to {path}")
    png = os.path.join(args.out, "compare.png")
    if plot(result, png):
        print(f"plot written to {png}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="[LABEL=]FILE.py[:PRESET][@KEY=VALUE...]; the first is the baseline of the paired differences")
    p.add_argument("--out", required=True, help="OUT/LABEL/seed<S>/ work directories, OUT/compare.json and .png")
    p.add_argument("--seeds", type=Number(int, ge=1), default=3, help="train.seed 0..SEEDS-1 for every config (default 3)")
    p.add_argument("--last-steps", type=Number(int, ge=1), help="training loss averaged over the last K steps (default: the last "
                                                   "fifth of train.steps)")
    p.add_argument("--eval-max-docs", type=Number(int, ge=0), help="evaluate on the first N documents (0: all; default: "
                                                      "data.eval_max_docs)")
    p.add_argument("--eval-split", choices=["validation", "test", "train"], help="default: data.eval_split")
    p.add_argument("--cache-size", type=Number(int, ge=0), default=0,
                   help="also evaluate every checkpoint with the output cache of this many entries (e.g. 3072), "
                        "fitted on --cache-tune-docs other documents: a table with and without it")
    p.add_argument("--cache-mixtures", default="fill",
                   help="the cache's weight, a row each (comma-separated: fill, fixed, gate; see memtx.evaluate), "
                        "each later one paired with the first over seeds")
    p.add_argument("--cache-tune-docs", type=Number(int, ge=1), default=32,
                   help="documents after the reported ones to fit the cache's settings on (default 32)")
    p.add_argument("--compilation-cache", help="JAX's persistent compilation cache for the seeds and evaluations to "
                                               "share compiled steps (default OUT/compilation_cache; 'off': none)")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
