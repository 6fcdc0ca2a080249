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
"""

from __future__ import annotations

import json
import logging
import math
import os

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


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        # Local, shared (NFS) or object-store paths (gs://...): orbax writes all of them.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, memory: dict, data_state: dict) -> None:
        """Every process calls this; `data_state` is this process's {shard: stream state}."""
        data = {"shards": gather_json(data_state)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            memory=ocp.args.StandardSave(_non_empty(memory)),
            data=ocp.args.JsonSave(data)))

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
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=abstract_params, restore_args=restore_args, partial_restore=True)))
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

    def saved_param_names(self, step: int) -> list[str]:
        """The parameter paths (keystr) saved at `step` (empty if the metadata cannot be read)."""
        absl = logging.getLogger("absl")  # orbax warns that the step's metadata sits a level up
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            meta = ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), "params"))
        except Exception:  # noqa: BLE001 - another layout or a remote store: names unknown
            return []
        finally:
            absl.setLevel(level)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def run_checkpointer(cfg, workdir: str, **kwargs) -> Checkpointer:
    """The checkpoints of a run: `train.checkpoint_dir` (shared or gs://) or WORKDIR/checkpoints."""
    return Checkpointer(cfg.train.checkpoint_dir or os.path.join(workdir, "checkpoints"), **kwargs)
