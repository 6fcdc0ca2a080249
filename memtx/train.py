"""Train a memory-augmented LM on long documents; resumes from its work directory by itself.

    python -m memtx.train --config configs/txl.py:cpu --workdir runs/txl_cpu [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import jax

from memtx import checkpoint_owner, compilation_cache
from memtx import state as state_lib
from memtx.checkpoint import CheckpointWriteError, run_checkpointer, writable_directory
from memtx.cli import ArgumentParser, resolve_config, run_cli
from memtx.config import Config, ConfigError, load_json, save_json, to_dict
from memtx.data import check_vocab_fits, loss_masks, open_source
from memtx.data.fingerprint import corpus_fingerprint
from memtx.data.fingerprint import describe as describe_fingerprint
from memtx.data.stream import ShardedStream
from memtx.distributed import initialize_from_env, is_main_process, main_print
from memtx.memory import add_ons, registry
from memtx.fit import SHRINK, check_fits_here, is_out_of_memory
from memtx.flops import mfu
from memtx.metrics import MetricsWriter, MetricsWriteError, Progress, format_duration
from memtx.step import make_train_step
from memtx.workdir_files import read_run_info
from memtx.workdir_lock import WorkdirLock


class NonFiniteLoss(RuntimeError):
    pass


# What a checkpoint's continuation depends on; other fields (steps, logging, mesh) may change.
RESUME_KEYS = ("model", "data.corpus", "data.task", "data.text_key", "data.vocab", "data.shuffle_buffer",
               "data.split_fractions", "data.seq_len", "data.batch_size", "data.seed")


def check_resumable(saved: Config, cfg: Config, workdir: str) -> None:
    """One-line error when a work directory's checkpoints cannot continue under `cfg`."""
    old, new = to_dict(saved), to_dict(cfg)
    for key in RESUME_KEYS:
        a, b = old, new
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            diff = next((f"{key}.{k}: {a[k]} -> {b[k]}" for k in a if a[k] != b[k]), f"{key}: {a} -> {b}") \
                if isinstance(a, dict) else f"{key}: {a} -> {b}"
            raise ConfigError(f"work directory '{workdir}' holds a run with a different config ({diff}); "
                              "use a new --workdir or the same config")


def record_corpus(cfg: Config, workdir: str) -> dict:
    """Prints the training corpus's fingerprint and keeps it in WORKDIR/run_info.json (a note when
    it differs from the one recorded when the run started)."""
    fp = corpus_fingerprint(cfg.data)
    path = os.path.join(workdir, "run_info.json")
    info = read_run_info(workdir)  # one line if damaged
    before = info.get("corpus")
    if before and before.get("sha256") != fp["sha256"]:
        print(f"note: the training data changed since this run recorded it (was {describe_fingerprint(before)})",
              flush=True)
        info.setdefault("previous_corpus", []).append(before)
    info["corpus"] = fp
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    print(f"data: {describe_fingerprint(fp)}", flush=True)
    return fp


def warm_start(state: dict, source: str) -> dict:
    """A fresh run's state with the parameters it shares with `source`'s latest checkpoint (a work
    directory or a checkpoint directory): the Memorizing Transformer's recipe (§4.3) for adding a
    kNN memory to a pretrained model. Optimizer state and step start afresh."""
    from memtx.checkpoint import Checkpointer
    directory = os.path.join(source, "checkpoints") if os.path.isdir(os.path.join(source, "checkpoints")) else source
    if not os.path.isdir(directory):
        raise ConfigError(f"config key 'train.init_from': '{source}' is neither a work directory nor a checkpoint directory")
    ckpt = Checkpointer(directory, async_save=False)
    step = ckpt.latest_good_step()
    if step is None:
        raise ConfigError(f"config key 'train.init_from': no checkpoint in {directory}")
    params, fresh = ckpt.restore_shared_params(step, state["params"])
    ours = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    dropped = [name for name in ckpt.saved_param_names(step) if name not in ours]
    ckpt.close()
    main_print(f"warm start from step {step} of {directory}; initialised afresh: {', '.join(fresh) or 'nothing'}; "
               f"not used from the checkpoint: {', '.join(dropped) or 'nothing'}", flush=True)
    return {**state, "params": params}


def make_validation(setup: state_lib.Setup):
    """params -> {eval_perplexity, eval_bits_per_token, ...}: the first `train.eval_max_docs`
    documents of `data.eval_split`, through memtx.evaluate's own code and one compiled step."""
    from memtx.evaluation import evaluate
    from memtx.step import make_eval_step
    cfg = setup.cfg
    source_fn = lambda shard_index, num_shards: open_source(  # noqa: E731
        cfg.data, cfg.data.eval_split, train=False, max_docs=cfg.train.eval_max_docs, shard_index=shard_index,
        num_shards=num_shards)
    probe = source_fn(0, 1)  # a missing or empty split is a one-line error now, not at the first evaluation
    check_vocab_fits(probe.vocab, cfg.model.vocab_size)
    step_fn = make_eval_step(setup)

    def validate(params) -> dict:
        r = evaluate(setup, params, source_fn, verbose=False, step_fn=step_fn)
        out = {"eval_perplexity": r["perplexity"], "eval_bits_per_token": r["bits_per_token"],
               "eval_documents": r["documents"], "eval_tokens": r["tokens"], "eval_seconds": r["seconds"]}
        if r["perplexity_ci95"]:
            out["eval_perplexity_lo"], out["eval_perplexity_hi"] = r["perplexity_ci95"]
        if r.get("bits_per_byte") is not None:
            out["eval_bits_per_byte"] = r["bits_per_byte"]
        return out

    return validate


def train(cfg: Config, workdir: str, adopt_checkpoints: bool = False) -> dict:
    """Runs (or continues) training; returns a summary. Checkpoints and metrics go to `workdir`.

    With several processes each runs this same function: every process streams its shards of
    the documents and takes part in every step and checkpoint; process 0 alone prints, writes
    metrics and config.json. Checkpoints go to `train.checkpoint_dir` (default
    WORKDIR/checkpoints), which every process must reach: a shared file system or gs://. One that
    holds another run's checkpoints is refused unless `adopt_checkpoints` (checkpoint_owner.py)."""
    setup = state_lib.build(cfg)  # validates the config and the mesh before any compilation
    compilation_cache.use(cfg.train.compilation_cache_dir)
    check_fits_here(cfg, setup)  # the whole step's memory, estimated, against the devices'
    main = is_main_process()
    # This process's document shards, each in a seeded order, filling its rows of the batch.
    num_shards = cfg.data.shards or jax.process_count()
    if num_shards % jax.process_count():
        raise ConfigError(f"config key 'data.shards' ({num_shards}) must be a multiple of the number of processes "
                          f"({jax.process_count()})")
    stream = ShardedStream(
        lambda shard, n: open_source(cfg.data, "train", train=True, shard_index=shard, num_shards=n),
        cfg.data.batch_size, cfg.data.seq_len, num_shards=num_shards,
        process_index=jax.process_index(), process_count=jax.process_count(),
        loss_mask=loss_masks.get(cfg.data.loss_mask))
    check_vocab_fits(stream.source.vocab, cfg.model.vocab_size)
    writable_directory(workdir, "work directory")
    with WorkdirLock(workdir) if main else contextlib.nullcontext(), contextlib.ExitStack() as hold:
        return _train_locked(cfg, workdir, setup, stream, num_shards, adopt_checkpoints, hold)


class Preemption:
    """SIGTERM while training asks the loop to save the step it is at and stop (the previous
    handler is back on exit)."""

    def __enter__(self) -> Preemption:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class ProfileWindow:
    """Traces the steps train.profile_steps = (first, last) with jax.profiler into WORKDIR/profile."""

    def __init__(self, cfg: Config, workdir: str):
        self.steps = tuple(cfg.train.profile_steps)
        self.directory = os.path.join(workdir, "profile")
        self.tracing = False

    def before(self, step: int) -> None:
        """Called before running step `step` (1-based)."""
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, metrics) -> None:
        if self.tracing and step >= self.steps[1]:
            self.stop(metrics)

    def stop(self, metrics=None) -> None:
        if self.tracing:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            self.tracing = False
            main_print(f"profile of steps {self.steps[0]}..{self.steps[1]} written to {self.directory}", flush=True)


class StepLog:
    """The steps' metrics, kept on the device until a log step; then written (metrics.jsonl,
    TensorBoard; process 0), checked for non-finite values, and reported in a progress line with
    tokens/s and the ETA. Time spent evaluating is not counted as training time."""

    def __init__(self, cfg: Config, workdir: str, start: int, ckpt, stream, num_devices: int):
        self.cfg, self.ckpt, self.stream, self.start = cfg, ckpt, stream, start
        self.num_devices = num_devices  # the mesh's (MFU is per device of the mesh)
        self.writer = MetricsWriter(workdir, resume_step=start) if is_main_process() else None
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.pending: list[tuple[int, dict]] = []
        self.last: dict = {}  # the last step's written values
        self.progress = None  # started after the first (compiling) step
        self.window = (start, time.perf_counter())  # (step, time) the tokens/s window starts at
        if self.writer:
            self.writer.write_text("config", "```\n" + json.dumps(to_dict(cfg), indent=2) + "\n```", start)

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        if step == self.start + 1:
            jax.block_until_ready(metrics)
            main_print(f"first step (compilation included) took {time.perf_counter() - self.window[1]:.1f}s",
                       flush=True)
            self.progress = Progress(self.cfg.train.steps, done=step)

    def report(self, step: int, extra: dict) -> None:
        """Writes the pending steps (`extra` and the window's speed join the last one) and prints
        the progress line."""
        jax.block_until_ready(self.pending[-1][1])
        now = time.perf_counter()
        first, since = self.window
        timing = {} if first == self.start else {  # the first window includes compilation
            "step_time_s": (now - since) / (step - first),
            "tokens_per_s": (step - first) * self.tokens_per_step / (now - since)}
        utilisation = timing and mfu(self.cfg, timing["tokens_per_s"], self.num_devices, jax.devices()[0].device_kind)
        if utilisation:
            timing["mfu"] = utilisation
        self.window = (step, now)
        new_tokens = len(self.pending) * self.tokens_per_step
        loss = self._flush({**timing, **extra})
        if is_main_process():
            skipped = self.stream.skipped
            self.progress.report(step, new_tokens, f"loss {loss:.4f} ({loss / math.log(2):.3f} bits/token) "
                                 f"lr {self.last['lr']:.2e} gnorm {self.last['grad_norm']:.2f}"
                                 + (f" MFU {utilisation:.1%}" if utilisation else "")
                                 + (f" skipped docs {skipped}" if skipped else ""))

    def _flush(self, extra: dict) -> float:
        """Writes the pending steps' metrics; returns their mean loss. A non-finite loss or
        gradient stops the run (nothing after the last good checkpoint is saved)."""
        total = 0.0
        for i, (s, m) in enumerate(jax.device_get(self.pending)):
            values = {k: float(v) for k, v in m.items()}
            values["tokens_seen"] = s * self.tokens_per_step
            if i == len(self.pending) - 1:
                values.update(extra)
            bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(values[k])]
            if bad:
                self.ckpt.wait()
                raise NonFiniteLoss(f"non-finite {' and '.join(bad)} at step {s}; kept the last good checkpoint "
                                    f"(step {self.ckpt.latest_step() or 'none'}) in {self.ckpt.directory}")
            values["skipped_documents"] = self.stream.skipped  # unreadable or corrupt, so far (this process)
            if self.writer:
                self.writer.write(s, values)
            self.last, total = values, total + values["loss"]
        mean_loss = total / max(len(self.pending), 1)
        self.pending.clear()
        if self.writer:
            self.writer.flush()
        return mean_loss

    def evaluation(self, step: int, result: dict) -> None:
        if self.writer:
            self.writer.write(step, result, group="eval")
            self.writer.flush()
        main_print(f"step {step}: {self.cfg.data.eval_split} perplexity {result['eval_perplexity']:.3f} "
                   f"on {result['eval_documents']} documents, {result['eval_tokens']:,} tokens "
                   f"({format_duration(result['eval_seconds'])})", flush=True)
        self.window = (step, time.perf_counter())  # evaluation time is not training time
        if self.progress is not None:
            self.progress.last_time = self.window[1]

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _restore_or_init(cfg: Config, setup, ckpt, stream) -> tuple[int, dict, dict]:
    """(start step, state, memory): the newest checkpoint that verifies and restores (a damaged
    one is reported and set aside) with the data stream's position, or a fresh (or warm) start."""
    restored = ckpt.restore_latest(setup.abstract_state, state_lib.abstract_memory(setup, cfg.data.batch_size))
    if not restored:
        state = state_lib.init_state(setup, cfg.train.seed)
        if cfg.train.init_from:
            state = warm_start(state, cfg.train.init_from)
        return 0, state, state_lib.init_memory_sharded(setup, cfg.data.batch_size)
    start, state, memory, data_state = restored
    try:
        stream.restore(data_state)
    except ValueError as e:
        raise ConfigError(f"cannot resume the data stream saved in {ckpt.step_dir(start)}/data: {e}") from None
    main_print(f"resumed from step {start} in {ckpt.directory}", flush=True)
    return start, state, memory


def _describe_run(cfg: Config, setup, source, num_shards: int) -> None:
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
    main_print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, d {cfg.model.d_model}, "
               f"{registry.describe(cfg.model)}, segment {cfg.data.seq_len}, batch {cfg.data.batch_size}; "
               f"{source.num_docs or 'streamed'} training documents per shard, {num_shards} shard(s) over "
               f"{jax.process_count()} process(es) "
               f"({cfg.data.task + ' task' if cfg.data.task else cfg.data.corpus}, vocabulary {source.vocab.name}); "
               f"mesh {dict(setup.mesh.shape)}"
               + (f" ({setup.mesh.devices.size} of {jax.device_count()} devices)"
                  if setup.mesh.devices.size < jax.device_count() else ""), flush=True)


def _train_locked(cfg: Config, workdir: str, setup, stream, num_shards: int, adopt_checkpoints: bool,
                  hold: contextlib.ExitStack) -> dict:
    config_path = os.path.join(workdir, "config.json")
    saved = load_json(config_path) if os.path.exists(config_path) else None
    if saved is not None:
        check_resumable(saved, cfg, workdir)
    checkpoint_owner.check(cfg, saved, workdir, adopt_checkpoints)  # never into another run's checkpoints
    # A checkpoint directory that cannot be written, or a store that cannot be reached: one line, first.
    ckpt = run_checkpointer(cfg, workdir, keep=cfg.train.keep_checkpoints)
    if is_main_process():
        lock = checkpoint_owner.claim(cfg, workdir)  # a separate checkpoint directory: locked, owner recorded
        if lock is not None:
            hold.callback(lock.release)
        save_json(cfg, config_path)
        record_corpus(cfg, workdir)
    start, state, memory = _restore_or_init(cfg, setup, ckpt, stream)
    _describe_run(cfg, setup, stream.source, num_shards)

    train_step = make_train_step(setup)
    validate = make_validation(setup) if cfg.train.eval_every else None
    t = cfg.train
    stop_at = min(t.steps, start + t.stop_after) if t.stop_after else t.steps
    log = StepLog(cfg, workdir, start, ckpt, stream, setup.mesh.devices.size)
    profile = ProfileWindow(cfg, workdir)
    step, t0, metrics = start, time.perf_counter(), None
    # SIGTERM is handled until the last save has finished: one arriving while it is written waits
    # for it instead of killing the process half-way through (the default action).
    with Preemption() as preemption:
        try:
            while step < stop_at:
                profile.before(step + 1)
                state, memory, metrics = train_step(state, memory, state_lib.device_batch(setup, stream.next_batch()))
                step += 1
                profile.after(step, metrics)
                log.add(step, metrics)
                # Read once: a SIGTERM arriving later in this step (while it is logged or evaluated)
                # is handled after the next one, so the step announced as saved is always saved.
                preempted = preemption.requested
                save_now = step % t.checkpoint_every == 0 or step == stop_at or preempted
                eval_now = validate is not None and (step % t.eval_every == 0 or step == stop_at)
                if step % t.log_every == 0 or save_now or eval_now:
                    log.report(step, add_ons.train_metrics(cfg.model, state["params"], memory))
                if eval_now:
                    log.evaluation(step, validate(state["params"]))
                if save_now:
                    ckpt.save(step, state, memory, stream.state())
                if preempted:
                    main_print(f"SIGTERM: saved step {step}; rerun the same command to resume", flush=True)
                    break
        except Exception as e:  # noqa: BLE001 - jaxlib's XlaRuntimeError; re-raised unless out of device memory
            if isinstance(e, ConfigError) or not is_out_of_memory(e):
                raise
            raise ConfigError(f"the train step does not fit in the devices' memory "
                              f"({' '.join(str(e).split())[:160]}): {SHRINK}") from None
        finally:
            failing = sys.exc_info()[1]  # already failing: finishing the saves must not hide why
            try:
                profile.stop(metrics)
                ckpt.wait()
                ckpt.close()
                log.close()
            except (CheckpointWriteError, MetricsWriteError):
                if failing is None:
                    raise
    elapsed = time.perf_counter() - t0
    main_print(f"trained steps {start}..{step} in {format_duration(elapsed)}; checkpoints in {ckpt.directory}", flush=True)
    return {"start_step": start, "end_step": step, "seconds": elapsed, "last": log.last}


def main(args: argparse.Namespace, rest: list[str]) -> int:
    initialize_from_env()  # several processes (TPU pod, GPU cluster): before JAX touches a device
    cfg = resolve_config(args.config, args.workdir, rest)
    try:
        train(cfg, args.workdir, adopt_checkpoints=args.adopt_checkpoints)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="configs/NAME.py[:preset]; default: WORKDIR/config.json when resuming")
    p.add_argument("--workdir", required=True, help="checkpoints, config.json and metrics go here")
    p.add_argument("--adopt-checkpoints", action="store_true",
                   help="continue from the checkpoints in train.checkpoint_dir although another work directory wrote "
                        "them, or the saved run named another checkpoint directory (a moved run, copied checkpoints)")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
