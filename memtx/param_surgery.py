"""Parameter surgery on saved checkpoints: what a step holds, read from its metadata alone, and
restoring part of it into another model.

  saved_param_shapes  {parameter path: shape} of a step, without reading an array
  shape_mismatch      the first parameter saved with another shape than a model's (one phrase),
                      so another model's checkpoint is one clean line, not orbax's failure
  restore_params      the parameters a model names (evaluation with a part switched off)
  warm_start          a fresh model's parameters with every saved one of the same name put in

The Checkpointer (memtx/checkpoint.py) offers these as methods on its own steps.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from memtx.config import ConfigError


class CheckpointDamaged(ConfigError):
    """No checkpoint of a run could be restored; the message is one line."""


def saved_param_shapes(step_dir: str) -> dict[str, tuple]:
    """{parameter path (keystr): shape} saved in a step directory, from the metadata alone (empty
    if it cannot be read)."""
    absl = logging.getLogger("absl")  # orbax warns that the step's metadata sits a level up
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "params"))
    except Exception:  # noqa: BLE001 - another layout or a remote store: names unknown
        return {}
    finally:
        absl.setLevel(level)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ()) or ())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatch(saved: dict[str, tuple], abstract_params: dict) -> str | None:
    """The first parameter `saved` (saved_param_shapes) gives another shape than `abstract_params`
    ("parameter ['layer_0']['ffn']['wi'] is (32, 64) there, (48, 96) here"), or None."""
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


def _restore_partial(manager: ocp.CheckpointManager, step: int, abstract_params: dict):
    """The saved parameters `abstract_params` names (the others skipped); unnamed-there leaves stay abstract."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item=abstract_params, restore_args=restore_args, partial_restore=True))).params


def restore_params(manager: ocp.CheckpointManager, directory: str, step: int, abstract_params: dict) -> dict:
    """The parameters `abstract_params` names; saved ones it does not name are skipped, so a model
    can be evaluated with a part switched off (e.g. model.lamemo.look_ahead=false)."""
    mismatch = shape_mismatch(saved_param_shapes(os.path.join(directory, str(step))), abstract_params)
    if mismatch:
        raise ConfigError(f"the checkpoint at step {step} in {directory} is another model's: {mismatch}; "
                          "the config does not describe the model it was trained with")
    try:
        params = _restore_partial(manager, step, abstract_params)
    except Exception as e:  # noqa: BLE001 - orbax's many-line errors: damage, or another model
        raise CheckpointDamaged(f"cannot restore the parameters of step {step} in {directory} "
                                f"(damaged, or saved by a model of another shape): "
                                f"{' '.join(str(e).split())[:200]}") from None
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise ConfigError(f"the checkpoint at step {step} in {directory} has no parameter "
                          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: the config does not "
                          "describe the model it was trained with")
    return params


def first_non_finite(params: dict) -> str | None:
    """The path of the first parameter holding a nan or an inf, or None."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    finite = jax.device_get([jnp.all(jnp.isfinite(leaf)) for _, leaf in flat])
    return next((jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok), None)


def warm_start(manager: ocp.CheckpointManager, directory: str, step: int, fresh_params: dict) -> tuple[dict, list[str]]:
    """`fresh_params` with every parameter the checkpoint also has replaced by the saved one;
    returns (params, the names kept fresh). A saved parameter of another shape is a one-line error
    (a different model size)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), fresh_params)
    mismatch = shape_mismatch(saved_param_shapes(os.path.join(directory, str(step))), abstract)
    if mismatch:
        raise ConfigError(f"cannot warm-start from {directory}: {mismatch}")
    try:
        params = _restore_partial(manager, step, abstract)
    except ValueError as e:  # orbax: a saved array of another shape
        raise ConfigError(f"cannot warm-start from {directory}: {str(e).splitlines()[0]}") from None
    fresh_flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
    restored = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    merged, fresh = [], []
    for path, new in fresh_flat:
        old = restored.get(jax.tree_util.keystr(path))
        if old is None or isinstance(old, jax.ShapeDtypeStruct):
            merged.append(new)
            fresh.append(jax.tree_util.keystr(path))
        elif tuple(old.shape) != tuple(new.shape):
            raise ConfigError(f"cannot warm-start from {directory}: parameter {jax.tree_util.keystr(path)} "
                              f"has shape {tuple(old.shape)} there and {tuple(new.shape)} here")
        else:
            merged.append(old)
    return jax.tree_util.tree_unflatten(treedef, merged), fresh
