"""Proof that the kNN memory remembers: a synthetic long-range recall task.

Trains the same tiny model twice on the same generated documents for the same steps, once with
a kNN memory in its last layer and once without, then measures how often each predicts the value
of a key whose last entry lies farther back than the segment plus the XL cache:

    PYTHONPATH=. python scripts/recall_task.py [--task kv|text] [--steps N] [--workdir runs/recall]
        [--seed 0] [--config.KEY=VALUE ...] [--print-config]

Two tasks (`--task`):
- kv (the default; memtx/data/kv_recall.py): single-token keys and values from disjoint
  alphabets, loss on the answers only (`data.loss_mask=kv_recall_answers`), a one-layer model
  whose kNN layer has smeared keys (`model.smeared_keys`), so that it can form an induction head
  alone. 600 steps by default.
- text (memtx/data/recall.py): `#KV; ` entries of bytes, loss on every byte, the two-layer model
  of the earlier figures (18-26% far recall). 3000 steps by default.

Prints a table and writes WORKDIR/recall_results.json. The model with memory is also evaluated
with its memory emptied (knn.size=0), which should bring it back to chance. `--skip-baseline`
trains only the model with memory (the emptied-memory row is then the comparison): the test
suite's quick version. `--config.KEY=VALUE` overrides apply to both models' configs (e.g.
`--config.model.knn.gate_bias_init=3`), as in every memtx tool; `--print-config` prints the
memory model's resolved config and exits.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import jax

from memtx import state as state_lib
from memtx.checkpoint import Checkpointer
from memtx.cli import ArgumentParser, run_cli
from memtx.config import (Config, DataConfig, KNNConfig, MeshConfig, ModelConfig, OptimConfig,
                          TrainConfig, apply_override, parse_overrides, to_dict)
from memtx.data import kv_recall, recall
from memtx.studies.common import pyplot
from memtx.train import train


@dataclass(frozen=True)
class Task:
    """A recall task: its documents, its scoring and the model that learns it."""

    spec: object  # the generator's spec (recall.RecallSpec or kv_recall.KVSpec)
    write_corpus: object  # (directory, num_docs, seed, spec) -> paths
    accuracy: object  # (setup, params, texts, min_distance=None, buckets=()) -> results
    steps: int  # default training steps
    model: dict = field(default_factory=dict)  # make_config arguments


TASKS = {
    # 256-token documents of 2-token entries; one layer with smeared keys and the kNN memory
    "kv": Task(kv_recall.KVSpec(), kv_recall.write_corpus, kv_recall.recall_accuracy, 600,
               dict(num_layers=1, knn_layer=0, smeared_keys=(0,), loss_mask="kv_recall_answers")),
    # 256-byte documents, one-letter keys, no filler: dense practice
    "text": Task(recall.RecallSpec(), recall.write_recall_corpus, recall.recall_accuracy, 3000),
}


def make_config(corpus: str, *, knn: bool, steps: int, seed: int = 0, seq_len: int = 32, batch_size: int = 32,
                d_model: int = 128, num_heads: int = 4, num_layers: int = 2, knn_layer: int | None = None, knn_size: int = 256,
                k: int = 32, learning_rate: float = 3e-3, warmup_steps: int | None = None,
                final_lr_ratio: float = 0.1, init_std: float = 0.1, qk_norm: bool = False,
                gate_bias_init: float = 0.0, content_bias: bool = True, mem_len: int = 0, clip_norm: float = 0.25,
                b2: float = 0.999, clamp_len: int = 0, mesh_shape=(-1, 1, 1), smeared_keys: tuple[int, ...] = (),
                loss_mask: str = "") -> Config:
    """The tiny model of this task; `knn` switches the memory layer (the top layer by default)
    on or off. Pre-LN, d 128 and a larger init than the LM presets: the copying circuit forms
    sooner (with d 64 or post-LN, far recall stalled near 22-26% in our runs; see the README)."""
    layer = num_layers - 1 if knn_layer is None else knn_layer
    return Config(
        name=f"recall_{'knn' if knn else 'local'}",
        model=ModelConfig(num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_ff=4 * d_model, mem_len=mem_len,
                          pre_norm=True, init_std=init_std, qk_norm=qk_norm, clamp_len=clamp_len,
                          content_bias=content_bias, smeared_keys=smeared_keys,
                          knn=KNNConfig(enabled=knn, layers=(layer,), size=knn_size, k=k, backend="exact",
                                        gate_bias_init=gate_bias_init)),
        data=DataConfig(corpus=corpus, split_fractions=(1, 0, 0), seq_len=seq_len, batch_size=batch_size,
                        seed=seed, eval_batch_size=batch_size, loss_mask=loss_mask),
        optim=OptimConfig(learning_rate=learning_rate,
                          warmup_steps=min(100, steps // 10) if warmup_steps is None else warmup_steps,
                          final_lr_ratio=final_lr_ratio, clip_norm=clip_norm, b2=b2),
        train=TrainConfig(steps=steps, seed=seed, log_every=max(1, steps // 10), checkpoint_every=steps,
                          keep_checkpoints=1),
        mesh=MeshConfig(shape=mesh_shape))


def latest_params(cfg: Config, workdir: str):
    setup = state_lib.build(cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    params = ckpt.restore_params(step, setup.abstract_state["params"])
    ckpt.close()
    return setup, params, step


def evaluate_run(cfg: Config, workdir: str, texts: list[bytes], knn_size: int | None = None,
                 buckets: tuple[int, ...] = (), task: Task = TASKS["text"], foreign_store: bool = False) -> dict:
    """Recall accuracy of the run's latest checkpoint on `texts` (optionally at another kNN size;
    with `buckets`, also by distance; with `foreign_store`, each document reading another's store)."""
    if knn_size is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model.knn.size = knn_size
    setup, params, step = latest_params(cfg, workdir)
    result = task.accuracy(setup, params, texts, buckets=buckets, foreign_store=foreign_store)
    result["step"] = step
    return result


def run(steps: int, workdir: str, seed: int = 0, train_docs: int = 2000, eval_docs: int = 64,
        spec=None, verbose: bool = True, baseline: bool = True, overrides: list[str] = (), task: str = "text",
        curve_sizes: tuple[int, ...] = (), curve_length: int = 8192, **model) -> dict:
    """Generates the corpora, trains both models, evaluates them; returns the results.
    `overrides`: `--config.KEY=VALUE` strings applied to both models' configs; `model`:
    make_config arguments over the task's. `curve_sizes`: also the memory-size curve (size_curve)
    of the kNN model on `eval_docs` held-out documents of `curve_length` tokens."""
    the_task = TASKS[task]
    spec = spec or the_task.spec
    os.makedirs(workdir, exist_ok=True)
    train_dir, eval_dir = os.path.join(workdir, "corpus_train"), os.path.join(workdir, "corpus_eval")
    the_task.write_corpus(train_dir, train_docs, seed, spec)
    eval_paths = the_task.write_corpus(eval_dir, eval_docs, seed + 1_000_003, spec)  # held out
    texts = [open(p, "rb").read() for p in eval_paths]
    results = {"task": task, "spec": dataclasses.asdict(spec), "chance": spec.chance, "seed": seed,
               "train_docs": train_docs, "eval_docs": eval_docs, "device": str(jax.devices()[0].device_kind),
               "runs": []}
    for knn in (True, False) if baseline else (True,):
        cfg = make_config(train_dir, knn=knn, steps=steps, seed=seed, **{**the_task.model, **model})
        for key, text in parse_overrides(list(overrides)):
            apply_override(cfg, key, text)
        n, m = cfg.data.seq_len, cfg.model.mem_len
        if spec.gap < n + m:
            raise ValueError(f"spec.gap ({spec.gap}) must be >= seq_len + mem_len ({n + m})")
        run_dir = os.path.join(workdir, cfg.name)
        t0 = time.perf_counter()
        summary = train(cfg, run_dir) if verbose else _quiet(train, cfg, run_dir)
        seconds = time.perf_counter() - t0
        row = {"model": "kNN memory" if knn else "no kNN memory", "knn_size": cfg.model.knn.size if knn else None,
               "steps": summary["end_step"], "train_seconds": seconds, "final_loss": summary["last"].get("loss"),
               **evaluate_run(cfg, run_dir, texts, task=the_task)}
        results["runs"].append(row)
        if knn:  # the same parameters with the memory emptied: is the recall really the memory's?
            emptied = evaluate_run(cfg, run_dir, texts, knn_size=0, task=the_task)
            results["runs"].append({"model": "kNN model, memory emptied", "knn_size": 0, "steps": row["steps"],
                                    "train_seconds": None, "final_loss": None, **emptied})
            # ... and reading another document's store: the recall is of this document's entries
            foreign = evaluate_run(cfg, run_dir, texts, task=the_task, foreign_store=True)
            results["runs"].append({"model": "kNN model, foreign store", "knn_size": cfg.model.knn.size,
                                    "steps": row["steps"], "train_seconds": None, "final_loss": None, **foreign})
            if curve_sizes:
                results["size_curve"] = size_curve(cfg, run_dir, the_task, curve_spec(spec, curve_length),
                                                   os.path.join(workdir, "corpus_curve"), eval_docs, seed, curve_sizes)
    return results


def curve_spec(spec, length: int):
    """The size curve's documents: `spec` at `length` tokens; for the kv task, half the keys
    long-range, their distances log-uniform up to 3/4 of the length (kv_recall's module docstring),
    so that answers lie at every scale up to beyond the largest store."""
    if isinstance(spec, kv_recall.KVSpec):
        return dataclasses.replace(spec, length=length, long_keys=spec.num_keys // 2,
                                   far_max=max(spec.gap, length * 3 // 4))
    return dataclasses.replace(spec, length=length)


def size_curve(cfg: Config, run_dir: str, task: Task, spec, directory: str, num_docs: int, seed: int,
               sizes: tuple[int, ...]) -> dict:
    """Far recall by answer distance of the run's kNN model at each store size in `sizes`, on
    `num_docs` held-out documents of `spec`. An answer d tokens back is in a store of S entries
    when d <= S (the store holds the S tokens before the segment; more for later positions in
    it) and in none when d > S + N: the buckets' edges are every S and S + N."""
    paths = task.write_corpus(directory, num_docs, seed + 2_000_003, spec)
    texts = [open(p, "rb").read() for p in paths]
    N = cfg.data.seq_len
    edges = tuple(sorted({e for s in sizes for e in (s, s + N) if N < e < spec.length}))
    rows = []
    for size in sizes:
        result = evaluate_run(cfg, run_dir, texts, knn_size=size, buckets=edges, task=task)
        rows.append({"size": size, "accuracy": result["accuracy"], "by_distance": result["by_distance"]})
    return {"document_length": spec.length, "documents": num_docs, "edges": list(edges), "sizes": rows}


def format_size_curve(curve: dict, chance: float) -> str:
    """Far recall by distance bucket (rows) and store size (columns)."""
    buckets = curve["sizes"][0]["by_distance"]
    header = ["answer distance", "answers", *(f"store {r['size']}" for r in curve["sizes"])]
    lines = []
    for i, b in enumerate(buckets):
        if b["tokens"] == 0:
            continue
        span = f"[{b['min']}, {b['max']})" if b["max"] is not None else f">= {b['min']}"
        lines.append([span, str(b["tokens"]), *(f"{r['by_distance'][i]['accuracy']:.1%}" for r in curve["sizes"])])
    return (f"far recall by answer distance and kNN store size ({curve['documents']} held-out documents of "
            f"{curve['document_length']} tokens; chance {chance:.1%}):\n" + markdown_table(header, lines))


def plot_size_curve(curve: dict, chance: float, path: str) -> str | None:
    """accuracy against answer distance, one line per store size, its size marked; None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row in curve["sizes"]:
        points = [((b["min"] * (b["max"] or 2 * b["min"])) ** 0.5, b["accuracy"])  # geometric midpoints
                  for b in row["by_distance"] if b["tokens"]]
        line, = ax.plot(*zip(*points), marker="o", label=f"store {row['size']}")
        ax.axvline(row["size"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(chance, color="grey", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="answer distance (tokens back; bucket midpoints)", ylabel="far recall",
           ylim=(0, 1.02), title="kNN store size: recall while the answer is in the store")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _quiet(fn, *args):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def format_table(results: dict) -> str:
    header = ["model", "steps", "recalled tokens", "far recall acc.", "near query acc.", "first-definition acc.",
              "chance", "train time"]
    lines = [[r["model"], str(r["steps"]), str(r["recalled_tokens"]), f"{r['accuracy']:.1%}",
              f"{r['near_accuracy']:.1%}", f"{r['first_definition_accuracy']:.1%}", f"{results['chance']:.1%}",
              f"{r['train_seconds']:.0f}s" if r["train_seconds"] is not None else "-"] for r in results["runs"]]
    return markdown_table(header, lines)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A right-aligned Markdown table."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def main(args: argparse.Namespace, overrides: list[str]) -> int:
    p = parser()
    task = TASKS[args.task]
    try:
        sizes = tuple(int(s) for s in args.size_curve.split(",") if s.strip())
    except ValueError:
        p.error(f"--size-curve must be comma-separated store sizes, got '{args.size_curve}'")
    if any(s < 1 for s in sizes) or args.curve_length < 2:
        p.error("--size-curve sizes must be >= 1 and --curve-length >= 2")
    args.steps = task.steps if args.steps is None else args.steps
    for name in ("steps", "train_docs", "eval_docs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg = make_config(os.path.join(args.workdir, "corpus_train"), knn=True, steps=args.steps, seed=args.seed,
                      **task.model)
    for key, text in parse_overrides(overrides):  # one-line errors before anything is generated
        apply_override(cfg, key, text)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if os.path.exists(os.path.join(args.workdir, "recall_knn", "checkpoints")):
        print(f"note: {args.workdir} holds earlier runs; they resume (or are reused) rather than restart",
              file=sys.stderr)
    t0 = time.perf_counter()
    results = run(args.steps, args.workdir, args.seed, args.train_docs, args.eval_docs,
                  baseline=not args.skip_baseline, overrides=overrides, task=args.task, curve_sizes=sizes,
                  curve_length=args.curve_length)
    results["overrides"] = list(overrides)
    results["wall_seconds"] = time.perf_counter() - t0
    print(format_table(results))
    print(f"recalled tokens: values whose key was last seen >= {results['runs'][0]['min_distance']} tokens "
          f"earlier (the segment length; no XL cache), so only the kNN memory holds them; "
          f"{results['eval_docs']} held-out documents; total wall time {results['wall_seconds']:.0f}s")
    if "size_curve" in results:
        print(format_size_curve(results["size_curve"], results["chance"]))
        plot = plot_size_curve(results["size_curve"], results["chance"], os.path.join(args.workdir, "size_curve.png"))
        if plot:
            print(f"plot written to {plot}")
    path = os.path.join(args.workdir, "recall_results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="kv",
                   help="kv: single-token keys and values (default); text: the byte task of the earlier figures")
    p.add_argument("--steps", type=int, default=None, help="training steps of each model (default: kv 600, text 3000)")
    p.add_argument("--workdir", default="runs/recall", help="corpora, both runs and recall_results.json")
    p.add_argument("--seed", type=int, default=0, help="data, parameter init and document order")
    p.add_argument("--train-docs", type=int, default=2000)
    p.add_argument("--eval-docs", type=int, default=64)
    p.add_argument("--skip-baseline", action="store_true", help="do not train the model without memory")
    p.add_argument("--size-curve", default="", metavar="SIZES",
                   help="also far recall by answer distance at these kNN store sizes (e.g. 256,1024,4096), on "
                        "longer held-out documents; table, recall_results.json and size_curve.png")
    p.add_argument("--curve-length", type=int, default=8192, help="the size curve's document length in tokens")
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
