"""The device mesh and the mapping from logical axis names to mesh axes.

Layers only name logical axes (`("embed", "mlp")`, `("act_batch", "act_seq")`); the rules in
`cfg.mesh.rules` map those names to mesh axes. Everything that needs a sharding derives it
here from an abstract tree built with `jax.eval_shape`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from memtx.config import Config, ConfigError, validate


def make_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """Validates the config against the devices and builds the mesh (classic Auto axes). A shape
    without -1 that needs fewer devices than there are takes the first ones (a small run on one
    GPU of eight); across several processes the mesh must span them all."""
    devices = jax.devices() if devices is None else list(devices)
    shape = validate(cfg, len(devices))
    used = math.prod(shape)
    if used < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh.shape {tuple(cfg.mesh.shape)} uses {used} of the {len(devices)} devices, "
                              f"but a run over {jax.process_count()} processes must span them all (use -1 in mesh.shape)")
        devices = devices[:used]
    else:  # all of them, laid out by their physical topology; the devices given (a TPU slice's, ahead of
        # time), never this machine's: a slice of 8 chips on a machine of 8 CPU devices once got the CPUs
        return jax.make_mesh(shape, cfg.mesh.axes, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), cfg.mesh.axes,
                             axis_types=(AxisType.Auto,) * len(shape))


def rules(cfg: Config) -> tuple:
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in cfg.mesh.rules)


def logical_sharding(mesh, cfg: Config, logical_axes: tuple) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(logical_axes, rules(cfg))
    return NamedSharding(mesh, spec)


def tree_shardings(mesh, cfg: Config, abstract_boxed):
    """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes (unboxed result)."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules(cfg))


def check_divisible(abstract, shardings, what: str = "state") -> None:
    """One-line ConfigError when a sharded dimension does not split evenly over its mesh axes."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_sh):
        for dim, axes in enumerate(sharding.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(sharding.mesh.shape[a] for a in axes)
            if leaf.shape[dim] % n:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise ConfigError(
                    f"{what} '{name}' dimension {dim} (size {leaf.shape[dim]}) is not divisible by mesh "
                    f"axes {axes} (size {n}); change mesh.shape, mesh.rules or the model size")


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
