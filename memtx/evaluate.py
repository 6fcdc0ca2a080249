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
import copy
import json
import math
import os
import sys
import time

import jax
import numpy as np

from memtx import probes, stats
from memtx import state as state_lib
from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, UsageError, parse_int_list, resolve_config, run_cli
from memtx.config import Config, config_hash, stable_hash, to_dict
from memtx.data import DocumentStream, check_vocab_fits, open_source
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.fingerprint import describe as describe_fingerprint
from memtx.data.sources import SourceFn
from memtx.distributed import initialize_from_env, is_main_process, main_print
from memtx.memory import registry
from memtx.loss_breakdown import (COPY_BUCKETS, DEFAULT_FAR_REACH, DEFAULT_NGRAM, POSITION_BUCKETS, LossBreakdown,
                                  Segment)
from memtx.metrics import Progress, format_duration
from memtx.step import make_eval_step


def stream_documents(setup: state_lib.Setup, params, source_fn: SourceFn, step_fn, *, log_every: int = 50,
                     verbose: bool = True, label: str = "", breakdown: LossBreakdown | None = None) -> dict:
    """Streams the documents of `source_fn(process_index, process_count)` (an evaluation source:
    every document once, in a fixed order), one per row, memory carried inside a document and
    reset between documents, through `step_fn(params, memory, batch) -> (memory, sums)`; returns
    the sums added over all segments as float64 numpy values, with "documents" (how many were
    read) and "skipped_documents". Evaluation and the studies share it.

    A per-token `nll_BN` in the step's output is not summed: it goes, with what each row holds
    (document id = index in the evaluation order * shards + shard; target offsets), to
    `breakdown` (then gathered from every process)."""
    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    rows = B // jax.process_count()
    first_row = jax.process_index() * rows  # this process's block of the global batch
    source = source_fn(jax.process_index(), jax.process_count())
    shard, num_shards = getattr(source, "shard_index", 0), getattr(source, "num_shards", 1)
    stream = DocumentStream(source, rows, N, count_bytes=True)
    memory = state_lib.init_memory_sharded(setup, B)
    segments = scored = scored_reported = 0
    # Progress in tokens scored (this process's shard) where the source can tell how many there
    # will be: documents differ in length by orders of magnitude, so documents started say little.
    expected_tokens = getattr(source, "expected_tokens", lambda: None)
    by_tokens = hasattr(source, "expected_tokens")
    progress = Progress(expected_tokens() or 0, unit="tokens") if by_tokens else \
        Progress(source.num_docs or 0, unit="documents")
    sums, pending, pending_rows = {}, [], []

    def accumulate():
        for step_sums, row_segments in zip(jax.device_get(pending), pending_rows):
            nll_BN = step_sums.pop("nll_BN", None)
            if breakdown is not None and nll_BN is not None:
                breakdown.add(row_segments, nll_BN[first_row:first_row + rows])
            for key, value in step_sums.items():
                sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
        pending.clear()
        pending_rows.clear()

    while True:
        # Multi-host: every process steps until all are done (their shards may differ in length).
        batch = stream.next_batch()
        any_left = batch is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            any_left = bool(multihost_utils.process_allgather(np.array(any_left)).any())
        if not any_left:
            break
        row_segments = [None] * rows if batch is None else [
            None if seg is None else Segment(seg[0][1] * num_shards + shard, *seg[1:]) for seg in stream.last_segments]
        batch = idle_batch(rows, N, source.vocab.pad_id) if batch is None else batch
        scored += int(np.count_nonzero(batch["weights"]))
        memory, step_sums = step_fn(params, memory, state_lib.device_batch(setup, batch))
        pending.append(step_sums)
        pending_rows.append(row_segments)
        segments += 1
        if segments % log_every == 0:
            accumulate()
            if verbose:
                new_tokens, scored_reported = scored - scored_reported, scored
                if by_tokens:
                    progress.total = expected_tokens() or 0  # a better estimate as documents are read
                    docs = f"documents {stream.documents_started}" + (f"/{source.num_docs}" if source.num_docs else "")
                    progress.report(scored, new_tokens, f"{docs} {label}".rstrip())
                else:
                    progress.report(stream.documents_started, new_tokens, label)
    accumulate()
    counts = np.array([stream.documents_started, stream.skipped, stream.bytes_drawn], np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(counts).sum(axis=0)
    sums["documents"], sums["skipped_documents"], sums["bytes"] = counts
    if breakdown is not None:
        breakdown.gather()
    return sums


def evaluate(setup: state_lib.Setup, params, source_fn: SourceFn, *, log_every: int = 50, verbose: bool = True,
             local_window: int | None = None, far_reach: int = DEFAULT_FAR_REACH,
             copy_ngram: int = DEFAULT_NGRAM, step_fn=None) -> dict:
    """Streams `source_fn`'s documents through the model; returns NLL sum, token count,
    perplexity with its bootstrap 95% interval over documents, bits per token and per byte (the
    bytes the scored tokens decode to, for any vocabulary), per-document NLL sums, and the loss by position and copyability (local window
    default: segment + memory length). `step_fn`: a `make_eval_step(setup)` to reuse (training
    evaluates many times with one compiled step)."""
    cfg = setup.cfg
    window = cfg.data.seq_len + cfg.model.mem_len if local_window is None else local_window
    breakdown = LossBreakdown(window, far_reach, copy_ngram)
    t0 = time.perf_counter()
    sums = stream_documents(setup, params, source_fn, step_fn or make_eval_step(setup), log_every=log_every, verbose=verbose,
                            breakdown=breakdown)
    seconds = time.perf_counter() - t0
    nll_sum, tokens = float(sums.get("nll", 0.0)), float(sums.get("tokens", 0.0))
    result = {"nll_sum": nll_sum, "tokens": int(tokens), "documents": int(sums["documents"]),
              "skipped_documents": int(sums["skipped_documents"]),
              "perplexity": math.exp(nll_sum / max(tokens, 1)),
              "bits_per_token": nll_sum / (math.log(2) * max(tokens, 1)),
              # over the bytes of the text the scored tokens stand for (the vocabulary decodes
              # them): a byte per token with the byte vocabulary (BOS is an input, never a target)
              "bits_per_byte": nll_sum / (math.log(2) * float(sums["bytes"])) if sums.get("bytes") else None,
              "bytes": int(sums.get("bytes", 0)),
              "vocab": cfg.data.vocab, "seconds": seconds}
    result.update(breakdown.result())
    docs = result["documents_nll"]
    result["perplexity_ci95"] = list(stats.bootstrap_perplexity(docs["nll"], docs["tokens"])) if docs["id"] else None
    if cfg.model.knn.enabled and cfg.model.knn.size:
        result["knn_fill"] = float(sums["fill_sum"]) / max(tokens, 1)
        result["knn_top1_score"] = float(sums["top1_sum"]) / max(float(sums["top1_count"]), 1)
        result["knn_gate"] = {str(layer): jax.nn.sigmoid(probes.attention_param(params, int(layer), "gate_bias")).tolist()
                              for layer in cfg.model.knn.layer_indices(cfg.model.num_layers)}
    return result


def idle_batch(rows: int, seq_len: int, pad_id: int) -> dict:
    return {"inputs": np.full((rows, seq_len), pad_id, np.int32), "targets": np.full((rows, seq_len), pad_id, np.int32),
            "weights": np.zeros((rows, seq_len), np.float32), "reset": np.zeros((rows,), bool)}


# ------------------------------------------------------------------------------------- tables


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


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


def not_paired(a: dict, b: dict) -> str | None:
    """Why two evaluation results cannot be paired document by document (None: they can)."""
    if a.get("split") != b.get("split"):
        return f"split {b.get('split')} against {a.get('split')}"
    if (a.get("corpus") or {}).get("sha256") != (b.get("corpus") or {}).get("sha256"):
        return "a different corpus"
    da, db = a.get("documents_nll"), b.get("documents_nll")
    if not da or not db or not da["id"] or da["id"] != db["id"]:
        return "different documents"
    if da["tokens"] != db["tokens"]:
        return "different token counts (vocabulary)"
    return None


def paired_rows(rows: list[dict]) -> list[dict]:
    """Each row after the first against the first, on the same documents (stats.paired_difference),
    or with `not_paired` saying why not."""
    base, out = rows[0], []
    for r in rows[1:]:
        why = not_paired(base, r)
        entry = {"run": r["run"], "knn_size": r.get("knn_size"), "against": base["run"],
                 "against_knn_size": base.get("knn_size")}
        if why:
            out.append({**entry, "not_paired": why})
            continue
        a, b = base["documents_nll"], r["documents_nll"]
        out.append({**entry, **stats.paired_difference(a["nll"], b["nll"], a["tokens"], b["tokens"])})
    return out


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


def run_config(workdir: str, config_spec: str | None = None, overrides: list[str] = (), split: str | None = None) -> Config:
    """A work directory's config (or `config_spec`) with overrides and the evaluation split."""
    if not os.path.isdir(workdir):
        raise UsageError(f"work directory '{workdir}' does not exist")
    cfg = resolve_config(config_spec, workdir, list(overrides))
    if split:
        cfg.data.eval_split = split
    return cfg


def default_far_reach(cfgs: list[Config], knn_sizes: list[int] | None) -> int:
    """The largest kNN memory size evaluated, or DEFAULT_FAR_REACH without one."""
    sizes = [s for c in cfgs if c.model.knn.enabled for s in (knn_sizes or [c.model.knn.size])]
    return max([s for s in sizes if s > 0] or [DEFAULT_FAR_REACH])


def _json_ready(x):
    return json.loads(json.dumps(x))


def result_path(workdir: str, identity: dict) -> str:
    """WORKDIR/eval_SPLIT_CORPUSHASH[_maxN][_firstT]_memM[_knnK]_stepS_IDHASH.json: the readable
    part says what a reader looks for, IDHASH (8 hex digits of the whole identity: corpus, split,
    limits, vocabulary, model config, step) tells apart what it does not (clamped distances,
    another segment...): a different evaluation never overwrites another, the same one rewrites
    its own file."""
    knn = identity["model"]["knn"]
    digest = stable_hash(identity)
    stem = (f"eval_{identity['split']}_{identity['corpus']['sha256'][:8]}"
            + (f"_max{identity['max_docs']}" if identity["max_docs"] else "")
            + (f"_first{identity['doc_tokens']}" if identity.get("doc_tokens") else "") + f"_mem{identity['model']['mem_len']}"
            + (f"_knn{knn['size']}" if knn["enabled"] else "") + f"_step{identity['step']}_{digest}")
    return os.path.join(workdir, stem + ".json")


def run_names(workdirs: list[str]) -> list[str]:
    """Each work directory's name in the tables: its last path component, or as many as make it
    unique (runs/a/seed0 and runs/b/seed0: a/seed0, b/seed0)."""
    parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(set(map(tuple, parts))):
            return names
    return names


def evaluate_workdir(workdir: str, cfg: Config, *, step: int | None = None, knn_sizes: list[int] | None = None,
                     local_window: int | None = None, far_reach: int = DEFAULT_FAR_REACH,
                     copy_ngram: int = DEFAULT_NGRAM, reuse: bool = False, name: str | None = None,
                     overrides: list[str] = ()) -> list[dict]:
    """Evaluates one work directory's checkpoint (`step`, default the latest) under `cfg`, at each
    of `knn_sizes` if it has a kNN memory; writes each result's JSON (see `result_path`) and returns
    the results. `reuse`: a result already written for the same evaluation and copyability settings
    is read back instead of evaluated again."""
    setups = []
    for size in knn_sizes if knn_sizes and cfg.model.knn.enabled else [None]:
        c = copy.deepcopy(cfg)
        if size is not None:
            c.model.knn.size = size
        setups.append(state_lib.build(c))  # validates every size (k <= size, bytes that fit) first
    ckpt = run_checkpointer(cfg, workdir, async_save=False)
    step = step if step is not None else ckpt.latest_good_step()
    if step is None or step not in ckpt.all_steps():
        raise UsageError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}")
    source_fn = lambda shard_index, num_shards: open_source(  # noqa: E731
        cfg.data, cfg.data.eval_split, train=False, max_docs=cfg.data.eval_max_docs, shard_index=shard_index,
        num_shards=num_shards)
    probe = source_fn(0, 1)  # one-line errors (missing data, vocabulary too large) before any compilation
    check_vocab_fits(probe.vocab, cfg.model.vocab_size)
    fingerprint = corpus_fingerprint(cfg.data)
    window = cfg.data.seq_len + cfg.model.mem_len if local_window is None else local_window
    copyability = {"local_window": window, "far_reach": far_reach, "ngram": copy_ngram}
    where = f"{cfg.data.task} task" if cfg.data.task else f"corpus {cfg.data.corpus}"
    rows, params = [], None
    for setup in setups:
        m = setup.cfg.model
        knn_size = m.knn.size if m.knn.enabled else None
        identity = _json_ready({"split": cfg.data.eval_split, "corpus": fingerprint, "max_docs": cfg.data.eval_max_docs,
                                "doc_tokens": cfg.data.eval_doc_tokens, "split_fractions": cfg.data.split_fractions, "vocab": cfg.data.vocab,
                                "seq_len": cfg.data.seq_len, "model": to_dict(setup.cfg)["model"], "step": step})
        path = result_path(workdir, identity)
        if reuse and os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            if result.get("copyability") == copyability and "documents_nll" in result:
                main_print(f"{workdir}: step {step} already evaluated in {path}", flush=True)
                rows.append({**result, "json_path": path})
                continue
        if params is None:
            params = ckpt.restore_params(step, setups[0].abstract_state["params"])  # the same for every size
        main_print(f"{workdir}: evaluating step {step} on {probe.num_docs or 'all'} {cfg.data.eval_split} documents of the {where}, "
                   f"{registry.describe(m, with_knn=False)}, kNN memory {knn_size if knn_size is not None else 'none'}, segment {cfg.data.seq_len}",
                   flush=True)
        result = evaluate(setup, params, source_fn, verbose=is_main_process(), local_window=window,
                          far_reach=far_reach, copy_ngram=copy_ngram)
        result.update(run=name or os.path.basename(os.path.normpath(workdir)), split=cfg.data.eval_split, mem_len=m.mem_len,
                      memory=m.memory, knn_size=knn_size, seq_len=cfg.data.seq_len, step=step,
                      corpus=fingerprint, identity=identity, overrides=list(overrides),
                      config_sha256=config_hash(setup.cfg))
        if is_main_process():
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
        rows.append({**result, "json_path": path})
    return rows


def main(args: argparse.Namespace, rest: list[str]) -> int:
    initialize_from_env()  # several processes: before JAX touches a device
    sizes = parse_int_list("--knn-sizes", args.knn_sizes) if args.knn_sizes is not None else None
    if args.copy_ngram < 1:
        raise UsageError(f"--copy-ngram must be >= 1, got {args.copy_ngram}")
    if args.far_reach is not None and args.far_reach < 1:
        raise UsageError(f"--far-reach must be >= 1, got {args.far_reach}")
    cfgs = [run_config(workdir, args.config, rest, args.split) for workdir in args.workdir]
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
