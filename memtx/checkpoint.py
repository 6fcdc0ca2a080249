"""orbax checkpoints of everything a run needs to continue exactly where it stopped.

Items of one checkpoint step:
  params     model parameters (evaluation restores only this)
  train      {"step", "opt_state"}
  memory     the carried memory state of every row, flattened to {path: array}; zero-size
             leaves (an XL cache of length 0, an empty kNN store) are left out, since orbax
             cannot write them, and come back as zeros of their abstract shape
  data       the document streams' positions (JSON): {"shards": {shard index: stream state}},
             gathered from every process (each restores its own shards)
Saves are asynchronous; restore targets are abstract trees carrying shardings.

Three parts: this module stores and restores (orbax) and decides what to do with a damaged step;
memtx/checkpoint_integrity.py records and checks each step's files; memtx/param_surgery.py reads
what a step holds and restores part of it into another model (partial restore, warm start).

Integrity: once a step's save has finished, process 0 writes `STEP/memtx_integrity.json`, the
size and CRC-32 of every file of the step (local and shared file systems; not gs://). Restoring
the latest checkpoint verifies it first; a damaged or incomplete one (garbled or truncated
files, a deleted item, an empty step directory) is reported in one line and the one before is
used. Training moves the damaged step aside (`STEP.damaged`, kept for inspection) because it will
write that step number again; evaluation only skips it. A step that verifies is trusted: if it
then fails to restore, that is an error, not damage. With no restorable step the run stops with
one line rather than start afresh over its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from memtx import checkpoint_integrity as integrity
from memtx import checkpoint_owner, orbax_logs, param_surgery
from memtx.checkpoint_integrity import INTEGRITY_FILE
from memtx.config import ConfigError
from memtx.errors import UsageError
from memtx.orbax_logs import WRITE_FAILURES
from memtx.param_surgery import CheckpointDamaged


class DataStateUnreadable(Exception):
    """A step's data-stream item is not readable JSON (one line)."""


def _non_empty(tree) -> dict:
    """{path: leaf} for the leaves of `tree` that hold at least one element."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat if math.prod(leaf.shape) > 0}


def _fill_empty(restored: dict, abstract_tree):
    """The inverse of `_non_empty`: restored leaves back in place, zeros for the empty ones."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    leaves = [restored[jax.tree_util.keystr(path)] if math.prod(a.shape) > 0 else
              jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding) for path, a in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def gather_json(local: dict) -> dict:
    """Every process's dict merged into one, on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return dict(local)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    merged = {}
    for row, n in zip(rows, lengths):
        merged.update(json.loads(row[:n].tobytes()))
    return merged


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (disk full...); the message is one line. The process
    should exit right after reporting it: orbax's background writers are in an undefined state."""


__all__ = ["INTEGRITY_FILE", "CheckpointDamaged", "CheckpointWriteError", "Checkpointer", "run_checkpointer",
           "writable_directory"]


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        orbax_logs.quiet()  # memtx reports failed writes and reads in one line
        # Local, shared (NFS) or object-store paths (gs://...): orbax writes all of them.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.local = "://" not in directory
        if self.local:
            writable_directory(self.directory, "checkpoint directory")
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        except Exception as e:  # noqa: BLE001 - an unreachable store (gs:// offline, no credentials): many kinds
            if self.local:
                raise
            first = " ".join(str(e).split())[:200]
            raise CheckpointWriteError(f"cannot reach the checkpoint directory {self.directory}: {first}") from None
        self._unrecorded: list[int] = []  # saved steps whose integrity record is not written yet

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _record_finished_saves(self, wait: bool = False) -> None:
        """Writes the integrity record of every step saved since the last call (after waiting
        for its save to finish: usually long done). A save that failed (a full disk, a lost
        mount) is one CheckpointWriteError naming the step, the directory and the reason."""
        if not self._unrecorded and not wait:
            return
        steps, self._unrecorded = self._unrecorded, []
        try:
            self.manager.wait_until_finished()
            if self.local and jax.process_index() == 0:
                for step in steps:
                    if os.path.isdir(self.step_dir(step)):  # not already rotated out
                        integrity.write_record(self.step_dir(step), step)
        except Exception as e:  # noqa: BLE001 - orbax raises from its background threads
            raise self._write_error(steps, e) from None

    def _write_error(self, steps: list[int], error: BaseException) -> "CheckpointWriteError":
        text = " ".join(str(error).split())
        reason = next((r for r in WRITE_FAILURES if r in text), text[:160] or type(error).__name__)
        done = [s for s in self.manager.all_steps() if s not in steps and os.path.isdir(self.step_dir(s))]
        kept = f"the last complete checkpoint is step {max(done)}" if done else "no checkpoint was completed"
        which = ", ".join(map(str, steps)) or "?"
        return CheckpointWriteError(f"could not write checkpoint step {which} to {self.directory}: {reason}; "
                                    f"{kept}, and the run resumes from it once the problem is fixed")

    def verify(self, step: int) -> str | None:
        """What is wrong with a step's files (checkpoint_integrity.verify), or None; remote stores
        are not checked."""
        return integrity.verify(self.step_dir(step)) if self.local else None

    def step_to_read(self, step: int | None) -> int:
        """The step evaluation, generation and the studies read: `step` when named (it must exist
        and match its integrity record), else the newest good one; otherwise one line."""
        if step is None:
            step = self.latest_good_step()
            if step is None:
                steps = self.all_steps()
                if not steps:
                    raise UsageError(f"no checkpoint in {self.directory}")
                raise CheckpointDamaged(f"no undamaged checkpoint in {self.directory} (newest: step {steps[-1]}, "
                                        f"{self.verify(steps[-1])})")
            return step
        if step not in self.all_steps():
            raise UsageError(f"no checkpoint at step {step} in {self.directory}")
        problem = self.verify(step)
        if problem is not None:
            raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} is damaged ({problem}): name another "
                                    "--step, or none for the newest good one")
        return step

    def latest_good_step(self, verbose: bool = True) -> int | None:
        """The newest step whose files match their integrity record (or that has none); each
        damaged newer one is reported in one line (evaluation: nothing is moved)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                return step
            if verbose and jax.process_index() == 0:
                print(f"note: checkpoint step {step} in {self.directory} is damaged ({problem}); using an earlier one",
                      file=sys.stderr, flush=True)
        return None

    def restore_latest(self, abstract_state: dict, abstract_memory: dict):
        """Training's resume: (step, state, memory, data states) of the newest restorable step,
        or None when there is no checkpoint. Damaged newer steps are reported and moved aside
        (STEP.damaged); with no restorable step at all, a one-line CheckpointDamaged."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                recorded = integrity.has_record(self.step_dir(step))
                mismatch = self.shape_mismatch(step, abstract_state["params"])
                if mismatch:  # intact files of another model: not damage
                    raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} is another model's ({mismatch}): "
                                            "the config does not describe the model it was trained with")
                try:
                    restored = self.restore(step, abstract_state, abstract_memory)
                except DataStateUnreadable as e:
                    if recorded:  # its files match their record: refused, not resumed silently from an earlier step
                        raise CheckpointDamaged(f"checkpoint step {step} in {self.directory}: {e}") from None
                    problem = str(e)
                except Exception as e:  # noqa: BLE001 - see below
                    first = " ".join(str(e).split())[:200]
                    if recorded:  # the files are as written: not damage, but another model's checkpoint
                        raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} is intact but does not "
                                                f"restore into this config's model (saved by another model?): "
                                                f"{first}") from None
                    problem = "it cannot be read: " + first
                else:
                    self._set_aside(damaged)
                    return (step, *restored)
            damaged.append((step, problem))
            if jax.process_index() == 0:
                print(f"note: checkpoint step {step} in {self.directory} is damaged ({problem}); "
                      "trying the one before", file=sys.stderr, flush=True)
        if damaged:
            raise CheckpointDamaged(f"no checkpoint in {self.directory} can be restored (newest: step {damaged[0][0]}, "
                                    f"{damaged[0][1]}); move the directory away to start afresh")
        return None

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Renames damaged steps to STEP.damaged (their numbers will be written again), then
        reopens the manager so that it forgets them."""
        if not damaged:
            return
        if jax.process_index() == 0 and self.local:
            for step, _ in damaged:
                target = self.step_dir(step) + ".damaged"
                n = 1
                while os.path.exists(target):
                    n += 1
                    target = f"{self.step_dir(step)}.damaged{n}"
                os.rename(self.step_dir(step), target)
                print(f"note: moved the damaged step {step} to {target}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("memtx: damaged checkpoints set aside")
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, memory: dict, data_state: dict) -> None:
        """Every process calls this; `data_state` is this process's {shard: stream state}."""
        data = {"shards": gather_json(data_state)}
        self._record_finished_saves()
        self._unrecorded.append(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
                memory=ocp.args.StandardSave(_non_empty(memory)),
                data=ocp.args.JsonSave(data)))
        except Exception as e:  # noqa: BLE001 - a synchronous part of the write failed
            raise self._write_error([step], e) from None

    def restore(self, step: int, abstract_state: dict, abstract_memory: dict) -> tuple[dict, dict, dict]:
        """-> (state, memory, every shard's data-stream state {shard: state})."""
        try:  # the stream's JSON first, on its own: its damage is named as such, not as another model's
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
        except Exception as e:  # noqa: BLE001 - whatever orbax raises for bytes that are not JSON
            raise DataStateUnreadable(f"its data stream state {self.step_dir(step)}/data cannot be read "
                                      f"({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
        train_target = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            train=ocp.args.StandardRestore(train_target),
            memory=ocp.args.StandardRestore(_non_empty(abstract_memory))))
        state = {"step": out.train["step"], "params": out.params, "opt_state": out.train["opt_state"]}
        data = data if isinstance(data, dict) else {}  # its shards are checked by the stream's restore
        return state, _fill_empty(out.memory, abstract_memory), data.get("shards")

    # Parameter surgery (memtx/param_surgery.py) on this run's steps.

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """The parameters `abstract_params` names (param_surgery.restore_params). A local step
        without an integrity record (saved before records, or killed before its record) cannot be
        compared with what was written: its parameters must at least all be finite."""
        params = param_surgery.restore_params(self.manager, self.directory, step, abstract_params)
        if self.local and not integrity.has_record(self.step_dir(step)):
            bad = param_surgery.first_non_finite(params)
            if bad is not None:
                raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} has no integrity record and its "
                                        f"parameter {bad} is not finite: it is damaged; name another --step")
        return params

    def restore_shared_params(self, step: int, fresh_params: dict) -> tuple[dict, list[str]]:
        """Warm start (param_surgery.warm_start): (params, the names kept fresh)."""
        return param_surgery.warm_start(self.manager, self.directory, step, fresh_params)

    def saved_param_shapes(self, step: int) -> dict[str, tuple]:
        return param_surgery.saved_param_shapes(self.step_dir(step))

    def saved_param_names(self, step: int) -> list[str]:
        """The parameter paths (keystr) saved at `step` (empty if the metadata cannot be read)."""
        return list(self.saved_param_shapes(step))

    def shape_mismatch(self, step: int, abstract_params: dict) -> str | None:
        """The first parameter saved at `step` with another shape than `abstract_params` gives it, or None."""
        return param_surgery.shape_mismatch(self.saved_param_shapes(step), abstract_params)

    def wait(self) -> None:
        self._record_finished_saves(wait=True)

    def close(self) -> None:
        self._record_finished_saves()
        self.manager.close()


def writable_directory(path: str, what: str) -> None:
    """Creates `path` if needed; a file in the way, a missing permission or a read-only file
    system is a one-line ConfigError naming the path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"the {what} {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"the {what} {path} is not writable")


def run_checkpointer(cfg, workdir: str, **kwargs) -> Checkpointer:
    """The checkpoints of a run: `train.checkpoint_dir` (shared or gs://) or WORKDIR/checkpoints."""
    return Checkpointer(checkpoint_owner.checkpoint_dir(cfg, workdir), **kwargs)
