"""LaMemo's memorizing coefficient (LaMemo paper, Figure 6): the mean of
alpha = S / (S + Z' + 1e-6) per layer against the memory index (0 = the oldest slot ... M-1 =
the newest), one line per layer.

    python -m memtx.studies.alpha --workdir runs/default/lamemo/seed0 [--out runs/studies] [--config.data.eval_max_docs=N]

alpha is the weight a memory slot keeps on its carried attention output C when the look-ahead
at the current segment refreshes it; 1 - alpha goes to the new look-ahead result. S is the
slot's accumulated softmax denominator (over the keys it has attended so far), Z' the
denominator of its look-ahead over the keys after it among the newest min(M, N) positions
ending at the first current token, so the newest slots see few new keys and keep most of C
(alpha near 1), while older slots, which see the whole window, trade S against Z'.
Averaged over segments, rows and heads, counting only slots that hold tokens of the row's
document (in the memory as read, after resets) and rows whose segment has scored tokens.
Runs that are not LaMemo are skipped.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from memtx import probes
from memtx import state as state_lib
from memtx.cli import UsageError, run_cli
from memtx.memory import registry
from memtx.evaluation import stream_documents
from memtx.metrics import markdown_table
from memtx.studies import common


def alpha_reduce(model_cfg):
    """(memory as read, batch, intermediates) -> {alpha_LM: sums over rows and heads, count_M}."""
    kind, num_layers = registry.of(model_cfg), model_cfg.num_layers

    def reduce(memory_in, batch, inter):
        valid_BM = kind.state.valid_mask(memory_in[kind.name]) & jnp.any(batch["weights"] > 0, axis=-1)[:, None]
        alpha_LBMH = jnp.stack([probes.attention(inter, l, "alpha") for l in range(num_layers)])
        H = alpha_LBMH.shape[-1]
        return {"alpha_LM": jnp.sum(jnp.where(valid_BM[None, :, :, None], alpha_LBMH, 0.0), axis=(1, 3)),
                "count_M": jnp.sum(valid_BM, axis=0).astype(jnp.float32) * H}

    return reduce


def study_run(run: common.Run) -> dict:
    setup = state_lib.build(run.cfg)
    params = run.restore_params(setup)
    docs = run.documents()
    print(f"{run.name}: step {run.step}, {run.split} documents, memory {run.cfg.model.mem_len}", flush=True)
    step_fn = common.make_segment_step(setup, alpha_reduce(run.cfg.model))
    sums = stream_documents(setup, params, docs, step_fn, label=run.name)
    alpha_LM = common.safe_mean(sums["alpha_LM"], sums["count_M"][None, :])
    return {"workdir": run.workdir, "step": run.step, "mem_len": run.cfg.model.mem_len,
            "seq_len": run.cfg.data.seq_len, "documents": int(sums["documents"]), "alpha_LM": alpha_LM,
            "count_M": sums["count_M"],
            "mean_alpha_L": common.safe_mean(sums["alpha_LM"].sum(-1), sums["count_M"].sum())}


def plot(result: dict, path: str) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        for layer, alpha_M in enumerate(run["alpha_LM"]):
            ax.plot(np.arange(len(alpha_M)), alpha_M, label=f"layer {layer}")
        ax.set_xlabel("memory index (0 = oldest)")
        ax.set_ylabel("mean alpha")
        ax.set_title(f"{name}: memorizing coefficient ({result['split']})\n"
                     f"{common.title_note(result['provenance'], run['documents'])}", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_table(result: dict) -> str:
    fmt = lambda x: "-" if not np.isfinite(x) else f"{x:.3f}"
    lines = []
    for name, run in result["runs"].items():
        M = run["mem_len"]
        for layer, alpha_M in enumerate(run["alpha_LM"]):
            lines.append([name, str(layer), fmt(alpha_M[0]), fmt(alpha_M[M // 2]), fmt(alpha_M[-1]),
                          fmt(run["mean_alpha_L"][layer])])
    return markdown_table(["run", "layer", "oldest slot", "middle slot", "newest slot", "all slots"], lines)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    runs = common.find_runs(args, rest)
    lamemo_runs = [r for r in runs if registry.of(r.cfg.model).refreshes]
    for r in runs:
        if r not in lamemo_runs:
            print(f"{r.name}: its memory is not refreshed by look-ahead (model.memory={r.cfg.model.memory}): skipped")
    if not lamemo_runs:
        raise UsageError("the alpha study needs a LaMemo run (model.memory=lamemo)")
    for r in lamemo_runs:
        if r.cfg.model.mem_len == 0:
            raise UsageError(f"{r.name}: the alpha study needs a memory (model.mem_len > 0)")
    return common.report("alpha", args, rest, lamemo_runs, study_run, format_table, plot)


def parser() -> argparse.ArgumentParser:
    return common.parser(__doc__)


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
