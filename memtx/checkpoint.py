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
import logging
import math
import os
import sys
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from memtx.config import ConfigError


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


INTEGRITY_FILE = "memtx_integrity.json"


def _file_digests(step_dir: str) -> dict[str, list]:
    """{relative path: [size, crc32]} of every file under a step directory but the record."""
    out = {}
    for dirpath, _, filenames in os.walk(step_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, step_dir)
            if rel == INTEGRITY_FILE:
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            out[rel] = [os.path.getsize(path), crc]
    return out


class CheckpointDamaged(ConfigError):
    """No checkpoint of a run could be restored; the message is one line."""


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (disk full...); the message is one line. The process
    should exit right after reporting it: orbax's background writers are in an undefined state."""


# Why a write fails, as the OS words it (named in memtx's one line; orbax's own logs of it dropped).
WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


class _QuietFailedSaves(logging.Filter):
    """Drops orbax's multi-line error logs about a failed write (a full disk, a read-only mount):
    memtx reports the failure itself, in one line."""

    SIGNS = (*WRITE_FAILURES, "Save Finalize thread", "Handler Commit operations")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(sign in text for sign in self.SIGNS)


logging.getLogger("absl").addFilter(_QuietFailedSaves())


class _QuietAbandonedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's parallel array reads: when
    one read fails (a damaged file, another model's shapes) the others' errors are never awaited,
    and asyncio prints each with its traceback. memtx reports the failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("never retrieved" in text and "orbax" in text)


logging.getLogger("asyncio").addFilter(_QuietAbandonedReads())


def _quiet_closed_loop_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops "Event loop is closed" from tensorstore's write
    threads. When one array write of an async save fails (a full disk), orbax's event loop ends
    and closes while the other writes are still finishing; their completion callbacks, called from
    tensorstore's C++ threads, then fail to schedule onto the closed loop and Python prints each
    as an unraisable exception (a traceback per array, interleaved). memtx reports the failed
    save itself, in one line; every other unraisable exception still goes to `previous`."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


sys.unraisablehook = _quiet_closed_loop_callbacks(sys.unraisablehook)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        # Local, shared (NFS) or object-store paths (gs://...): orbax writes all of them.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.local = "://" not in directory
        if self.local:
            writable_directory(self.directory, "checkpoint directory")
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
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
                        record = {"step": step, "files": _file_digests(self.step_dir(step))}
                        tmp = os.path.join(self.step_dir(step), INTEGRITY_FILE + ".tmp")
                        with open(tmp, "w") as f:
                            json.dump(record, f)
                        os.replace(tmp, os.path.join(self.step_dir(step), INTEGRITY_FILE))
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
        """What is wrong with a step's files against its integrity record (one phrase), or None
        when they match or there is no record to check (a step saved before records, or killed
        before its record was written)."""
        if not self.local:
            return None
        step_dir = self.step_dir(step)
        if not os.path.isdir(step_dir) or not os.listdir(step_dir):
            return "its directory is empty"
        try:
            with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
                recorded = json.load(f)["files"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {INTEGRITY_FILE} is damaged"
        actual = _file_digests(step_dir)
        for rel, (size, crc) in sorted(recorded.items()):
            if rel not in actual:
                return f"{rel} is missing"
            if actual[rel][0] != size:
                return f"{rel} has {actual[rel][0]} bytes where {size} were written"
            if actual[rel][1] != crc:
                return f"{rel} does not match its checksum"
        return None

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
                recorded = os.path.exists(os.path.join(self.step_dir(step), INTEGRITY_FILE))
                mismatch = self.shape_mismatch(step, abstract_state["params"])
                if mismatch:  # intact files of another model: not damage
                    raise CheckpointDamaged(f"checkpoint step {step} in {self.directory} is another model's ({mismatch}): "
                                            "the config does not describe the model it was trained with")
                try:
                    restored = self.restore(step, abstract_state, abstract_memory)
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
        train_target = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            train=ocp.args.StandardRestore(train_target),
            memory=ocp.args.StandardRestore(_non_empty(abstract_memory)),
            data=ocp.args.JsonRestore()))
        state = {"step": out.train["step"], "params": out.params, "opt_state": out.train["opt_state"]}
        return state, _fill_empty(out.memory, abstract_memory), out.data.get("shards", {})

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """The parameters `abstract_params` names; saved ones it does not name are skipped, so a
        model can be evaluated with a part switched off (e.g. model.lamemo.look_ahead=false)."""
        mismatch = self.shape_mismatch(step, abstract_params)
        if mismatch:
            raise ConfigError(f"the checkpoint at step {step} in {self.directory} is another model's: {mismatch}; "
                              "the config does not describe the model it was trained with")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                item=abstract_params, restore_args=restore_args, partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - orbax's many-line errors: damage, or another model
            raise CheckpointDamaged(f"cannot restore the parameters of step {step} in {self.directory} "
                                    f"(damaged, or saved by a model of another shape): "
                                    f"{' '.join(str(e).split())[:200]}") from None
        missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(out.params)[0]
                   if isinstance(leaf, jax.ShapeDtypeStruct)]
        if missing:
            raise ConfigError(f"the checkpoint at step {step} in {self.directory} has no parameter "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: the config does not "
                              "describe the model it was trained with")
        return out.params

    def restore_shared_params(self, step: int, fresh_params: dict) -> tuple[dict, list[str]]:
        """Warm start: `fresh_params` with every parameter the checkpoint also has replaced by the
        saved one; returns (params, the names kept fresh). A saved parameter of another shape is a
        one-line error (a different model size)."""
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), fresh_params)
        mismatch = self.shape_mismatch(step, abstract)
        if mismatch:
            raise ConfigError(f"cannot warm-start from {self.directory}: {mismatch}")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True)))
        except ValueError as e:  # orbax: a saved array of another shape
            raise ConfigError(f"cannot warm-start from {self.directory}: {str(e).splitlines()[0]}") from None
        fresh_flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
        restored = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(out.params)[0]}
        merged, fresh = [], []
        for path, new in fresh_flat:
            old = restored.get(jax.tree_util.keystr(path))
            if old is None or isinstance(old, jax.ShapeDtypeStruct):
                merged.append(new)
                fresh.append(jax.tree_util.keystr(path))
            elif tuple(old.shape) != tuple(new.shape):
                raise ConfigError(f"cannot warm-start from {self.directory}: parameter {jax.tree_util.keystr(path)} "
                                  f"has shape {tuple(old.shape)} there and {tuple(new.shape)} here")
            else:
                merged.append(old)
        return jax.tree_util.tree_unflatten(treedef, merged), fresh

    def saved_param_shapes(self, step: int) -> dict[str, tuple]:
        """{parameter path (keystr): shape} saved at `step`, from the metadata alone (empty if it
        cannot be read)."""
        absl = logging.getLogger("absl")  # orbax warns that the step's metadata sits a level up
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            meta = ocp.PyTreeCheckpointer().metadata(os.path.join(self.step_dir(step), "params"))
        except Exception:  # noqa: BLE001 - another layout or a remote store: names unknown
            return {}
        finally:
            absl.setLevel(level)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ()) or ())
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def saved_param_names(self, step: int) -> list[str]:
        """The parameter paths (keystr) saved at `step` (empty if the metadata cannot be read)."""
        return list(self.saved_param_shapes(step))

    def shape_mismatch(self, step: int, abstract_params: dict) -> str | None:
        """The first parameter saved at `step` with another shape than `abstract_params` gives it
        ("['layer_0']['ffn']['wi'] is (32, 64) there, (48, 96) here"), or None. Checked before
        restoring, so that another model's checkpoint is one clean line, not orbax's failure."""
        saved = self.saved_param_shapes(step)
        here = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
        stacked_there, stacked_here = (any(name.startswith("['layers_") for name in names) for names in (saved, here))
        if saved and stacked_there != stacked_here:  # model.scan_layers: the same layers under other names
            return (f"its layers are {'stacked (model.scan_layers=true)' if stacked_there else 'unrolled'}, this "
                    f"config's are {'stacked' if stacked_here else 'unrolled (model.scan_layers=false)'}; set "
                    "model.scan_layers as it was, or convert with memtx.layers.stack_params / unstack_params")
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
            name = jax.tree_util.keystr(path)
            if name in saved and saved[name] and tuple(saved[name]) != tuple(leaf.shape):
                return f"parameter {name} is {tuple(saved[name])} there, {tuple(leaf.shape)} here"
        return None

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
    return Checkpointer(cfg.train.checkpoint_dir or os.path.join(workdir, "checkpoints"), **kwargs)
