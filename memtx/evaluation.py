"""The evaluation library: stream held-out documents through a checkpoint's model (one document
per row, memory carried inside a document and reset between documents), per-document NLL with a
bootstrap interval, paired comparisons of runs on the same documents, and the loss by position
and copyability; evaluated results are kept as JSON in the work directory. Training's
validation, `memtx.compare` and the studies call it; `python -m memtx.evaluate` (evaluate.py) is
its command line, tables and plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from memtx import batch as batch_layout
from memtx import cache_tuning, stats
from memtx import state as state_lib
from memtx.checkpoint import run_checkpointer
from memtx.errors import UsageError
from memtx.config import Config, config_hash, stable_hash, to_dict
from memtx.data import DocumentStream, check_vocab_fits, open_source
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.sources import SourceFn
from memtx.distributed import is_main_process, main_print
from memtx.loss_breakdown import DEFAULT_FAR_REACH, DEFAULT_NGRAM, LossBreakdown, Segment
from memtx.memory import add_ons, registry
from memtx.memory.output_cache import CacheSpec
from memtx.workdir_files import read_result
from memtx.metrics import Progress
from memtx.step import init_cache_memory, make_cache_eval_step, make_eval_step


def stream_documents(setup: state_lib.Setup, params, source_fn: SourceFn, step_fn, *, log_every: int = 50,
                     verbose: bool = True, label: str = "", breakdown: LossBreakdown | None = None,
                     init_memory=None) -> dict:
    """Streams the documents of `source_fn(process_index, process_count)` (an evaluation source:
    every document once, in a fixed order), one per row, memory carried inside a document and
    reset between documents, through `step_fn(params, memory, batch) -> (memory, sums)`; returns
    the sums added over all segments as float64 numpy values, with "documents" (how many were
    read) and "skipped_documents". Evaluation and the studies share it.

    Outputs named "per_token_*" ([B, N, ...]) are not summed but stacked, every process's rows
    together ([segments * B, N, ...]). A per-token `nll_BN` in the step's output is not summed: it goes, with what each row holds
    (document id = index in the evaluation order * shards + shard; target offsets), to
    `breakdown` (then gathered from every process)."""
    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    rows = B // jax.process_count()
    first_row = jax.process_index() * rows  # this process's block of the global batch
    source = source_fn(jax.process_index(), jax.process_count())
    shard, num_shards = getattr(source, "shard_index", 0), getattr(source, "num_shards", 1)
    stream = DocumentStream(source, rows, N, count_bytes=True)
    memory = init_memory() if init_memory else state_lib.init_memory_sharded(setup, B)  # the step's memory tree
    segments = scored = scored_reported = 0
    # Progress in tokens scored (this process's shard) where the source can tell how many there
    # will be: documents differ in length by orders of magnitude, so documents started say little.
    expected_tokens = getattr(source, "expected_tokens", lambda: None)
    by_tokens = hasattr(source, "expected_tokens")
    progress = Progress(expected_tokens() or 0, unit="tokens") if by_tokens else \
        Progress(source.num_docs or 0, unit="documents")
    sums, pending, pending_rows = {}, [], []

    collected = {}

    def accumulate():
        for step_sums, row_segments in zip(jax.device_get(pending), pending_rows):
            nll_BN = step_sums.pop("nll_BN", None)
            if breakdown is not None and nll_BN is not None:
                breakdown.add(row_segments, nll_BN[first_row:first_row + rows])
            for key in [k for k in step_sums if k.startswith("per_token_")]:  # [B, N, ...]: this process's rows
                collected.setdefault(key, []).append(np.asarray(step_sums.pop(key))[first_row:first_row + rows])
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
        batch = batch_layout.empty(rows, N, source.vocab.pad_id) if batch is None else batch
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
    for key, parts in collected.items():  # every segment's rows, [segments * rows, N, ...]
        sums[key] = np.concatenate(parts)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            sums[key] = np.asarray(multihost_utils.process_allgather(sums[key], tiled=True))
    if breakdown is not None:
        breakdown.gather()
    return sums


def evaluate(setup: state_lib.Setup, params, source_fn: SourceFn, *, log_every: int = 50, verbose: bool = True,
             local_window: int | None = None, far_reach: int = DEFAULT_FAR_REACH,
             copy_ngram: int = DEFAULT_NGRAM, step_fn=None, init_memory=None) -> dict:
    """Streams `source_fn`'s documents through the model; returns NLL sum, token count,
    perplexity with its bootstrap 95% interval over documents, bits per token and per byte (the
    bytes the scored tokens decode to, for any vocabulary), per-document NLL sums, and the loss by position and copyability (local window
    default: segment + memory length). `step_fn`: a `make_eval_step(setup)` to reuse (training
    evaluates many times with one compiled step; `init_memory`: the memory tree it carries, when
    not the model's alone)."""
    cfg = setup.cfg
    window = cfg.data.seq_len + cfg.model.mem_len if local_window is None else local_window
    breakdown = LossBreakdown(window, far_reach, copy_ngram)
    t0 = time.perf_counter()
    sums = stream_documents(setup, params, source_fn, step_fn or make_eval_step(setup), log_every=log_every, verbose=verbose,
                            breakdown=breakdown, init_memory=init_memory)
    seconds = time.perf_counter() - t0
    nll_sum, tokens = float(sums.get("nll", 0.0)), float(sums.get("tokens", 0.0))
    if not sums.get("bytes"):  # a perplexity of nothing would read as a result
        raise UsageError(f"nothing to evaluate: the {int(sums['documents'])} document(s) read hold no text "
                         "(empty files?)")
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
    if "model_nll" in sums:  # an output-cache step: the model alone on the same tokens, in the same pass
        result["model_nll_sum"] = float(sums["model_nll"])
        result["model_perplexity"] = math.exp(float(sums["model_nll"]) / max(tokens, 1))
        if "first64_tokens" in sums:
            early = max(float(sums["first64_tokens"]), 1)
            result["first_64_positions"] = {"tokens": int(sums["first64_tokens"]), "nll": float(sums["first64_nll"]) / early,
                                            "model_nll": float(sums["first64_model_nll"]) / early}
    result.update(add_ons.eval_result(cfg.model, params, sums, tokens))  # the kNN memory's fill, top-1, gate
    return result


# ------------------------------------------------------------------------------------- tables


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


def fit_cache(setup: state_lib.Setup, params, spec: CacheSpec, count: int, verbose: bool = True) -> dict:
    """The output cache's theta, lambda and fill fitted on `count` tuning documents (those after the
    reported ones) in one pass over a grid (memtx/cache_tuning.py); returns the fit's record."""
    source_fn, first, n = cache_tuning.tuning_source(setup.cfg, count)
    the_grid = cache_tuning.grid(spec, setup.cfg.model.d_model)
    B = setup.cfg.data.eval_batch_size
    sums = stream_documents(setup, params, source_fn, make_cache_eval_step(setup, spec, the_grid), verbose=verbose,
                            label=f"tuning the cache ({spec.size})", init_memory=lambda: init_cache_memory(setup, spec, B))
    return cache_tuning.record(sums, the_grid, setup.cfg, first, n)


def fit_gate(setup: state_lib.Setup, params, spec: CacheSpec, record: dict, count: int, verbose: bool = True) -> dict:
    """The learned gate (cache_tuning.train_gate) on the same tuning documents as `record`'s grid
    fit, with its theta: one more pass collects each token's model NLL, cache log-probability and
    gate features. Returns the record with "gate"."""
    source_fn, _, _ = cache_tuning.tuning_source(setup.cfg, count)
    best = cache_tuning.fitted_spec(spec, record)
    B = setup.cfg.data.eval_batch_size
    sums = stream_documents(setup, params, source_fn, make_cache_eval_step(setup, best, collect=True), verbose=verbose,
                            label=f"fitting the cache's gate ({spec.size})", init_memory=lambda: init_cache_memory(setup, best, B))
    return {**record, "gate": cache_tuning.train_gate(sums, best.lam)}


def _fitted(workdir: str, setup: state_lib.Setup, params, spec: CacheSpec, step: int, identity: dict,
            record: dict | None, gate: bool, count: int, reuse: bool) -> dict:
    """The output cache's fit for this checkpoint: `record`, or with `reuse` the one saved in the
    work directory, or one fitted now on `count` tuning documents; with `gate`, extended by a
    learned gate if it has none. A fit made or extended here is saved (cache_tuning.fit_path)."""
    saved = cache_tuning.fit_path(workdir, spec, step, identity)
    if record is None and reuse and os.path.exists(saved):  # fitted before: the same documents
        record = cache_tuning.load_fit(saved, spec)
        main_print(f"{workdir}: the output cache's fit read from {saved}", flush=True)
    changed = record is None or (gate and "gate" not in record)
    if record is None:
        main_print(f"{workdir}: fitting the output cache ({spec.scorer}, {spec.size} entries) on {count} tuning "
                   "documents", flush=True)
        record = fit_cache(setup, params, spec, count, verbose=is_main_process())
    if gate and "gate" not in record:
        main_print(f"{workdir}: fitting the output cache's gate ({spec.size} entries) on the same {count} tuning "
                   "documents", flush=True)
        record = fit_gate(setup, params, spec, record, count, verbose=is_main_process())
    if changed and is_main_process():
        cache_tuning.save_fit(saved, spec, {k: v for k, v in record.items() if k not in ("saved_to", "loaded_from")},
                              identity)
        record = {**record, "saved_to": saved}
    return record


def cache_paired_rows(rows: list[dict]) -> list[dict]:
    """Each output-cache row against the same run's row without it (same kNN size), on the same documents."""
    out = []
    for r in rows:
        if not r.get("cache_size"):
            continue
        base = next((b for b in rows if b.get("run_base") == r["run_base"] and not b.get("cache_size")
                     and b.get("knn_size") == r.get("knn_size")), None)
        if base is not None:
            out += paired_rows([base, r])
    return out


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
    cache = identity.get("cache")
    digest = stable_hash(identity)
    stem = (f"eval_{identity['split']}_{identity['corpus']['sha256'][:8]}"
            + (f"_max{identity['max_docs']}" if identity["max_docs"] else "")
            + (f"_first{identity['doc_tokens']}" if identity.get("doc_tokens") else "") + f"_mem{identity['model']['mem_len']}"
            + (f"_knn{knn['size']}" if knn["enabled"] else "") + (f"_cache{cache['size']}" if cache else "")
            + f"_step{identity['step']}_{digest}")
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
                     overrides: list[str] = (), cache_sizes: list[int] = (), cache: CacheSpec | None = None,
                     cache_tune_docs: int = 32, cache_fit: str | None = None,
                     cache_mixtures: tuple[str, ...] = ("fill",)) -> list[dict]:
    """Evaluates one work directory's checkpoint (`step`, default the latest) under `cfg`, at each
    of `knn_sizes` if it has a kNN memory; writes each result's JSON (see `result_path`) and returns
    the results. `reuse`: a result already written for the same evaluation and copyability settings
    is read back instead of evaluated again. `cache_sizes`: also a row with the output cache of each
    size above 0 (`cache` gives its scorer, k, normalisation and backend), fitted on
    `cache_tune_docs` tuning documents (memtx/cache_tuning.py) or read from `cache_fit`, a row per
    `cache_mixtures` (cache_tuning.MIXTURES: "fill" is the row "RUN +cache S", the others
    "RUN +cache S fixed" and "RUN +cache S gate")."""
    setups = []
    for size in knn_sizes if knn_sizes and cfg.model.knn.enabled else [None]:
        c = copy.deepcopy(cfg)
        if size is not None:
            c.model.knn.size = size
        setups.append(state_lib.build(c))  # validates every size (k <= size, bytes that fit) first
    ckpt = run_checkpointer(cfg, workdir, async_save=False)
    step = ckpt.step_to_read(step)  # a named step: it must exist and be undamaged
    source_fn = lambda shard_index, num_shards: open_source(  # noqa: E731
        cfg.data, cfg.data.eval_split, train=False, max_docs=cfg.data.eval_max_docs, shard_index=shard_index,
        num_shards=num_shards)
    probe = source_fn(0, 1)  # one-line errors (missing data, vocabulary too large) before any compilation
    check_vocab_fits(probe.vocab, cfg.model.vocab_size)
    fingerprint = corpus_fingerprint(cfg.data)
    window = cfg.data.seq_len + cfg.model.mem_len if local_window is None else local_window
    copyability = {"local_window": window, "far_reach": far_reach, "ngram": copy_ngram}
    where = f"{cfg.data.task} task" if cfg.data.task else f"corpus {cfg.data.corpus}"
    cache_sizes = [size for size in cache_sizes if size > 0]
    fit_record = cache_tuning.load_fit(cache_fit, cache) if cache_sizes and cache_fit else None
    if cache_sizes and cache_fit is None:
        cache_tuning.tuning_documents(cfg, cache_tune_docs)  # its one-line errors before anything runs
    rows, params, fits_by_size = [], None, {}
    runs = [(setup, size, mixture) for setup in setups for size in [0, *cache_sizes]
            for mixture in (cache_mixtures if size else [None])]
    for setup, cache_size, mixture in runs:
        m = setup.cfg.model
        knn_size = m.knn.size if m.knn.enabled else None
        identity = _json_ready({"split": cfg.data.eval_split, "corpus": fingerprint, "max_docs": cfg.data.eval_max_docs,
                                "doc_tokens": cfg.data.eval_doc_tokens, "split_fractions": cfg.data.split_fractions, "vocab": cfg.data.vocab,
                                "seq_len": cfg.data.seq_len, "model": to_dict(setup.cfg)["model"], "step": step})
        spec = None
        if cache_size:
            if params is None:
                params = ckpt.restore_params(step, setups[0].abstract_state["params"])
            spec = dataclasses.replace(cache, size=cache_size)
            record = fit_record or fits_by_size.get(cache_size)
            if record is None or (mixture == "gate" and "gate" not in record):
                if record is not None and cache_fit is not None:
                    raise UsageError(f"--cache-fit {cache_fit} has no learned gate: fit one without --cache-fit")
                record = _fitted(workdir, setup, params, spec, step, identity, record, mixture == "gate",
                                 cache_tune_docs, reuse)
                fits_by_size[cache_size] = record
            spec = cache_tuning.mixture_spec(spec, record, mixture)
            # (no "gate" key without one: the results of caches fitted before gates existed still match)
            identity["cache"] = _json_ready({k: v for k, v in dataclasses.asdict(spec).items() if k != "gate" or v})
        path = result_path(workdir, identity)
        result = read_result(path) if reuse and os.path.lexists(path) else None  # a damaged one: evaluated again
        if result is not None and result.get("copyability") == copyability:
            main_print(f"{workdir}: step {step} already evaluated in {path}", flush=True)
            rows.append({**result, "json_path": path})
            continue
        if params is None:
            params = ckpt.restore_params(step, setups[0].abstract_state["params"])  # the same for every size
        main_print(f"{workdir}: evaluating step {step} on {probe.num_docs or 'all'} {cfg.data.eval_split} documents of the {where}, "
                   f"{registry.describe(m, with_add_ons=False)}, kNN memory {knn_size if knn_size is not None else 'none'}, segment {cfg.data.seq_len}",
                   flush=True)
        if spec is None:
            result = evaluate(setup, params, source_fn, verbose=is_main_process(), local_window=window,
                              far_reach=far_reach, copy_ngram=copy_ngram)
        else:
            B = cfg.data.eval_batch_size
            result = evaluate(setup, params, source_fn, verbose=is_main_process(), local_window=window,
                              far_reach=far_reach, copy_ngram=copy_ngram, step_fn=make_cache_eval_step(setup, spec),
                              init_memory=lambda: init_cache_memory(setup, spec, B))
            result["cache"] = {**dataclasses.asdict(spec), "fit": record}
        result.update(cache_size=cache_size, run_base=name or os.path.basename(os.path.normpath(workdir)))
        result.update(cache_mixture=mixture,
                      run=result["run_base"] + (f" +cache {cache_size}" if cache_size else "")
                      + (f" {mixture}" if mixture not in (None, "fill") else ""), split=cfg.data.eval_split, mem_len=m.mem_len,
                      memory=m.memory, knn_size=knn_size, seq_len=cfg.data.seq_len, step=step,
                      corpus=fingerprint, identity=identity, overrides=list(overrides),
                      config_sha256=config_hash(setup.cfg))
        if is_main_process():
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
        rows.append({**result, "json_path": path})
    return rows
