r"""Memory-length extrapolation (LaMemo paper, Figure 5): perplexity against the memory length
M = m x segment length used at evaluation, one curve per run (LaMemo beside Transformer-XL).

    python -m memtx.studies.extrapolation --workdir runs/default/xl/seed0 runs/default/lamemo/seed0 \
        [--multiples 1,2,4,8] [--out runs/studies] [--config.data.eval_max_docs=N] [--split validation]

The segment length stays the trained `data.seq_len`; each run's one checkpoint (parameters do
not depend on M) is evaluated at every M. A model that extrapolates keeps improving, or at
least does not degrade, as M grows beyond the length it was trained with. Relative distances
beyond those seen in training can be encoded as the longest one seen with
`--config.model.clamp_len=D` (Transformer-XL's clamp_len; D = trained M + N - 1).

With --cache-fit FILE (an output-cache fit `memtx.evaluate --cache-sizes` saved) every M is also
evaluated with that output cache mixed in (memtx/memory/output_cache.py): a dashed curve per run,
`RUN +cache` in the table. Whether a longer attention memory still pays once the cache holds the
document is the question it answers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

from memtx import state as state_lib
from memtx.cache_tuning import load_spec
from memtx.cli import parse_int_list, run_cli
from memtx.evaluation import evaluate
from memtx.step import init_cache_memory, make_cache_eval_step
from memtx.metrics import markdown_table
from memtx.studies import common


def study_run(run: common.Run, multiples: list[int], cache=None) -> list[dict]:
    """Perplexity of one run's checkpoint at M = m * seq_len for each m (and with the output cache
    `cache`, a CacheSpec, as "cache_perplexity")."""
    N = run.cfg.data.seq_len
    setups = []
    for m in multiples:
        cfg = copy.deepcopy(run.cfg)
        cfg.model.mem_len = m * N
        setups.append(state_lib.build(cfg))  # validates every M before anything runs
    params = run.restore_params(setups[0])
    docs = run.documents()
    points = []
    for m, setup in zip(multiples, setups):
        print(f"{run.name}: step {run.step}, {run.split} documents, memory {m} x {N} = {m * N}",
              flush=True)
        result = evaluate(setup, params, docs)
        points.append({"multiple": m, "mem_len": m * N, "perplexity": result["perplexity"],
                       "bits_per_byte": result["bits_per_byte"], "tokens": result["tokens"],
                       "documents": result["documents"],
                       "seconds": result["seconds"]})
        if cache is not None:
            B = setup.cfg.data.eval_batch_size
            with_cache = evaluate(setup, params, docs, step_fn=make_cache_eval_step(setup, cache),
                                  init_memory=lambda: init_cache_memory(setup, cache, B))
            points[-1]["cache_perplexity"] = with_cache["perplexity"]
    return points


def plot(result: dict, path: str) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, run in result["runs"].items():
        points = run["points"]
        ax.plot([p["multiple"] for p in points], [p["perplexity"] for p in points], "o-",
                label=f"{name} ({run['memory']}, trained M={run['trained_mem_len']}"
                      + (f", distances clamped at {run['clamp_len']})" if run.get("clamp_len") else ")"))
        if all("cache_perplexity" in p for p in points):
            ax.plot([p["multiple"] for p in points], [p["cache_perplexity"] for p in points], "o--",
                    color=ax.lines[-1].get_color(), label=f"{name} with the output cache ({result['cache']['size']})")
    values = [p[k] for run in result["runs"].values() for p in run["points"] for k in ("perplexity", "cache_perplexity")
              if k in p]
    if values and max(values) > 3 * min(values):  # one run blows up: keep the others readable
        ax.set_yscale("log")
    ax.set_xlabel("memory length / segment length")
    ax.set_xticks(sorted({p["multiple"] for run in result["runs"].values() for p in run["points"]}))  # integers
    ax.set_ylabel("perplexity")
    clamps = sorted({run["clamp_len"] for run in result["runs"].values() if run.get("clamp_len")})
    documents = {p.get("documents") for run in result["runs"].values() for p in run["points"]}
    note = ""
    if "provenance" in result:  # (a result written before provenance was recorded has none)
        note = "\n" + common.title_note(result["provenance"], documents.pop() if len(documents) == 1 else None)
    ax.set_title(f"{result['split']} perplexity against memory length"
                 + (f", distances clamped at {'/'.join(map(str, clamps))}" if clamps else ", distances not clamped")
                 + note, fontsize="medium")
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_table(result: dict) -> str:
    names = list(result["runs"])
    multiples = result["multiples"]
    by_run = {name: {p["multiple"]: p for p in run["points"]} for name, run in result["runs"].items()}
    cached = [n for n in names if all("cache_perplexity" in p for p in result["runs"][n]["points"])]
    lines = [[str(m), ", ".join(sorted({str(by_run[n][m]["mem_len"]) for n in names})),
              *(f"{by_run[n][m]['perplexity']:.3f}" for n in names),
              *(f"{by_run[n][m]['cache_perplexity']:.3f}" for n in cached)] for m in multiples]
    return markdown_table(["m", "memory M", *names, *(f"{n} +cache" for n in cached)], lines)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    multiples = sorted(set(parse_int_list("--multiples", args.multiples, minimum=1)))
    cache = load_spec(args.cache_fit) if args.cache_fit else None
    runs = common.find_runs(args, rest)
    prov = common.provenance(runs, rest, multiples=multiples,
                             **({"cache": dataclasses.asdict(cache), "cache_fit": args.cache_fit} if cache else {}))
    result = {"study": "extrapolation", "split": runs[0].split, "multiples": multiples, "provenance": prov, "runs": {}}
    if cache is not None:
        result["cache"] = dataclasses.asdict(cache)
    for run in runs:
        result["runs"][run.name] = {"workdir": run.workdir, "step": run.step, "memory": run.cfg.model.memory,
                                    "seq_len": run.cfg.data.seq_len, "trained_mem_len": run.cfg.model.mem_len,
                                    "clamp_len": run.cfg.model.clamp_len,
                                    "points": study_run(run, multiples, cache)}
    print(format_table(result))
    common.write_outputs(args.out, common.output_stem(f"extrapolation_{result['split']}", prov), result,
                         lambda path: plot(result, path))
    return 0


def parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__)
    p.add_argument("--multiples", default="1,2,3,4,5,6,7,8,9,10",
                   help="memory lengths as multiples of the segment length (default 1..10)")
    p.add_argument("--cache-fit", help="also evaluate with this saved output-cache fit (memtx.evaluate --cache-sizes "
                                       "writes WORKDIR/cache_fit_*.json)")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
