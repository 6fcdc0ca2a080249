"""The whole model's memory state: its kind's state (`model.memory`, see registry.py) plus each
add-on's state per layer that carries it (add_ons.py; today the kNN memory):

    {"<kind>": the kind's state, "knn": {"<layer>": kNN state, ...}}

These are the functions the train step, evaluation and generation share: init, reset the rows
that start a document, the logical axes from which shardings are derived, and the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from memtx.memory import add_ons, registry

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


def init(cfg: ModelConfig, batch_size: int) -> dict:
    kind = registry.of(cfg)
    return {kind.name: kind.state.init_for(cfg, batch_size), **add_ons.init(cfg, batch_size)}


def kind_name(memory: dict) -> str:
    """The kind of a memory pytree (its one key besides the add-ons')."""
    (name,) = (key for key in memory if key not in add_ons.NAMES)
    return name


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    name = kind_name(memory)
    return {name: registry.get(name).state.reset_rows(memory[name], reset_B), **add_ons.reset_rows(memory, reset_B)}


def logical_axes(cfg: ModelConfig) -> dict:
    kind = registry.of(cfg)
    return {kind.name: dict(kind.state.LOGICAL_AXES), **add_ons.logical_axes(cfg)}


def state_bytes(cfg: ModelConfig, batch_size: int) -> int:
    """Bytes of the whole memory state (all rows), to check against the devices before allocating:
    those of `init`'s abstract value, so no kind writes its own count."""
    shapes = jax.eval_shape(lambda: init(cfg, batch_size))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
