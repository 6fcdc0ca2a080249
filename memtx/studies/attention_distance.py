r"""Attention over context distance (LaMemo paper, Figure 1): how much attention mass the current
queries put on keys d tokens back when predicting a token, LaMemo beside Transformer-XL.

    python -m memtx.studies.attention_distance --workdir runs/default/xl/seed0 runs/default/lamemo/seed0 \
        [--out runs/studies] [--config.data.eval_max_docs=N] [--split validation] [--config.model.mem_len=0]

Query i of a segment sits at position M+i of [memory ; segment] (K = M+N keys, memory first);
key j is at distance d = M+i-j. The figure shows the mean attention probability at each
distance 0..K-1 (log scale), averaged over scored queries, heads, segments and layers, one
curve per run, and a panel per run with a curve per layer. The table gives, per layer, the
fraction of the mass on memory keys (j < M) and the mean attended distance. A memory that is
well used keeps mass at long distances; the paper's claim is that LaMemo's refreshed memory
draws more of it than Transformer-XL's stale one. (kNN layers: the local attention only.)
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from memtx import probes
from memtx import state as state_lib
from memtx.cli import UsageError, run_cli
from memtx.memory import model_memory, registry
from memtx.evaluation import stream_documents
from memtx.metrics import markdown_table
from memtx.studies import common


def distance_sums(probs_LBHNK, scored_BN, key_valid_BK) -> dict:
    """Sums over rows, heads and scored queries, by distance d = M+i-j:
    mass_LD (attention probability), visible_D (query-head pairs whose key at d is valid),
    memory_L (mass on keys j < M) and queries (scored query-head pairs)."""
    _, _, H, N, K = probs_LBHNK.shape
    M = K - N
    w_BN = scored_BN.astype(jnp.float32)
    mass_LNK = jnp.einsum("lbhnk,bn->lnk", probs_LBHNK.astype(jnp.float32), w_BN)
    visible_NK = jnp.einsum("bn,bk->nk", w_BN, key_valid_BK.astype(jnp.float32)) * H
    key_ND = M + jnp.arange(N)[:, None] - jnp.arange(K)[None, :]  # the key at distance d from query i
    causal_ND = key_ND >= 0

    def by_distance(x_NK):
        return jnp.sum(jnp.where(causal_ND, jnp.take_along_axis(x_NK, jnp.clip(key_ND, 0, K - 1), axis=-1), 0.0), 0)

    return {"mass_LD": jnp.stack([by_distance(m_NK) for m_NK in mass_LNK]), "visible_D": by_distance(visible_NK),
            "memory_L": jnp.sum(mass_LNK[:, :, :M], axis=(1, 2)), "queries": jnp.sum(w_BN) * H}


def distance_reduce(num_layers: int):
    def reduce(memory_in, batch, inter):
        name = model_memory.kind_name(memory_in)
        mem_valid_BM = registry.get(name).state.valid_mask(memory_in[name])  # every slot the layers attend
        B, N = batch["weights"].shape
        key_valid_BK = jnp.concatenate([mem_valid_BM, jnp.ones((B, N), bool)], axis=1)
        probs_LBHNK = jnp.stack([probes.attention(inter, l, "attn_prob") for l in range(num_layers)])
        return distance_sums(probs_LBHNK, batch["weights"] > 0, key_valid_BK)

    return reduce


def study_run(run: common.Run) -> dict:
    setup = state_lib.build(run.cfg)
    params = run.restore_params(setup)
    docs = run.documents()
    m = run.cfg.model
    print(f"{run.name}: step {run.step}, {run.split} documents, {registry.describe(m)}, "
          f"segment {run.cfg.data.seq_len}", flush=True)
    step_fn = common.make_segment_step(setup, distance_reduce(m.num_layers))
    sums = stream_documents(setup, params, docs, step_fn, label=run.name)
    queries = sums["queries"]
    mass_LD = common.safe_mean(sums["mass_LD"], queries)
    distance_D = np.arange(mass_LD.shape[1])
    return {"workdir": run.workdir, "step": run.step, "memory": m.memory, "mem_len": m.mem_len,
            "seq_len": run.cfg.data.seq_len, "documents": int(sums["documents"]), "queries": queries,
            "mass_D": mass_LD.mean(0), "mass_LD": mass_LD,
            "visible_fraction_D": common.safe_mean(sums["visible_D"], queries),
            "memory_fraction_L": common.safe_mean(sums["memory_L"], queries),
            "mean_distance_L": (mass_LD * distance_D).sum(-1)}


def plot(result: dict, path: str) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    runs = result["runs"]
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5.5 * (1 + len(runs)), 4.2), squeeze=False)
    positive = lambda x: np.where(np.asarray(x, float) > 0, x, np.nan)  # log axis: zeros are not drawn
    ax = axes[0, 0]
    for name, run in runs.items():
        ax.plot(positive(run["mass_D"]), label=f"{name} ({run['memory']}, M={run['mem_len']})")
    segments = {run["seq_len"] for run in runs.values()}
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_xlabel("distance to the key (tokens)")
        ax.set_ylabel("mean attention probability")
        ax.grid(True, alpha=0.3)
        if len(segments) == 1:  # beyond this distance every key is a memory key
            ax.axvline(next(iter(segments)), ls=":", color="gray")
    documents = {run["documents"] for run in runs.values()}
    axes[0, 0].set_title(f"mean over layers ({result['split']})\n"
                         f"{common.title_note(result['provenance'], documents.pop() if len(documents) == 1 else None)}",
                         fontsize="medium")
    axes[0, 0].legend(fontsize="small")
    for ax, (name, run) in zip(axes[0, 1:], runs.items()):
        for layer, mass_D in enumerate(run["mass_LD"]):
            ax.plot(positive(mass_D), label=f"layer {layer}")
        ax.set_title(f"{name}: per layer")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_table(result: dict) -> str:
    lines = []
    for name, run in result["runs"].items():
        for layer, (memory, distance) in enumerate(zip(run["memory_fraction_L"], run["mean_distance_L"])):
            lines.append([name, run["memory"], str(run["mem_len"]), str(layer), f"{memory:.1%}", f"{distance:.2f}"])
        lines.append([name, run["memory"], str(run["mem_len"]), "mean", f"{np.mean(run['memory_fraction_L']):.1%}",
                      f"{np.mean(run['mean_distance_L']):.2f}"])
    return markdown_table(["run", "memory", "M", "layer", "mass on memory", "mean distance"], lines)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    runs = common.find_runs(args, rest)
    for run in runs:
        kind = registry.of(run.cfg.model)
        if not kind.whole_segment:
            raise UsageError(f"{run.name}: the attention-distance study reads layers whose queries are the whole "
                             f"segment; {kind.label} layers attend block by block")
    return common.report("attention_distance", args, rest, runs, study_run, format_table, plot)


def parser() -> argparse.ArgumentParser:
    return common.parser(__doc__)


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
