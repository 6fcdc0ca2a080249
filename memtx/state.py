"""Abstract training state, its shardings, and sharded initialisation.

The state is built abstractly with `jax.eval_shape`, shardings are derived from the logical
axes the layers name, and the real state is created by a jit whose `out_shardings` place every
array where it belongs. Checkpoints restore into the same abstract tree.

A run is planned once: `build` validates the config and the mesh, checks that the memory state
fits, and derives the abstract state and every sharding; the Setup it returns is what training,
evaluation, generation and memtx.fit are handed (the memory's shardings and abstract trees are
derived once per Setup and batch size, not per call).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from memtx import batch as batch_layout
from memtx import sharding
from memtx.config import Config, ConfigError
from memtx.memory import model_memory
from memtx.model import TransformerLM, init_memory
from memtx.optimizer import make_optimizer


@dataclass
class Setup:
    """Everything the train loop and evaluation need that is derived from the config."""

    cfg: Config
    mesh: jax.sharding.Mesh
    model: TransformerLM
    tx: optax.GradientTransformation
    abstract_state: dict  # {"step", "params", "opt_state"} of ShapeDtypeStructs with shardings
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding  # [B, N] arrays
    row_sharding: jax.sharding.NamedSharding  # [B] arrays
    init_boxed: Callable  # rng -> state with logically-partitioned boxes (for init and shapes)
    memory_sharding: dict = dataclasses.field(default_factory=dict)  # the model memory's shardings (build)
    abstract_memories: dict = dataclasses.field(default_factory=dict)  # {batch size: abstract memory}, as asked


def dummy_inputs(cfg: Config, batch_size: int):
    """Inputs for `model.init`. Parameters do not depend on memory sizes, so tiny memories do."""
    m = dataclasses.replace(cfg.model, mem_len=min(cfg.model.mem_len, 1),
                            knn=dataclasses.replace(cfg.model.knn, size=cfg.model.knn.k))
    return (jnp.zeros((batch_size, cfg.data.seq_len), jnp.int32), init_memory(m, batch_size),
            jnp.zeros((batch_size,), jnp.int32))


def for_platform(model_cfg, mesh):
    """`model_cfg` with `knn.backend=auto` resolved for the devices of `mesh`, which the program is
    compiled for. At trace time `auto` would look at JAX's default backend: ahead of time from a CPU
    machine, a TPU slice's program would get the CPU's exact search, not the approximate one."""
    knn_options = model_cfg.knn
    if not knn_options.enabled or knn_options.backend != "auto" or not isinstance(mesh, jax.sharding.Mesh):
        return model_cfg  # an AbstractMesh has no devices: left to trace time
    from memtx.memory import knn
    backend = knn.resolve_backend("auto", knn_options.size, mesh.devices.flat[0].platform)
    return dataclasses.replace(model_cfg, knn=dataclasses.replace(knn_options, backend=backend))


def build(cfg: Config, mesh=None, check_fit: bool = True) -> Setup:
    """`mesh` may be abstract (jax.sharding.AbstractMesh) for sizes without devices (memtx.fit)."""
    mesh = sharding.make_mesh(cfg) if mesh is None else mesh
    if check_fit:
        check_parameters_fit(cfg, mesh)  # counted, not traced: tracing a million layers would take hours
        check_memory_fits(cfg, mesh, max(cfg.data.batch_size, cfg.data.eval_batch_size))
    model = TransformerLM(for_platform(cfg.model, mesh))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    def init_boxed(rng):  # a batch of 1 row: parameter shapes do not depend on it
        params = model.init(rng, *dummy_inputs(cfg, 1))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract_boxed = jax.eval_shape(lambda: init_boxed(jax.random.key(0)))  # nothing runs eagerly
    shardings = sharding.tree_shardings(mesh, cfg, abstract_boxed)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(abstract_boxed), shardings)
    sharding.check_divisible(abstract["params"], shardings["params"], "parameter")
    sharding.check_divisible(abstract, shardings, "optimizer state")
    memory_sharding = jax.tree.map(lambda a: sharding.logical_sharding(mesh, cfg, a),
                                   model_memory.logical_axes(cfg.model), is_leaf=lambda x: isinstance(x, tuple))
    return Setup(cfg, mesh, model, tx, abstract, shardings,
                 sharding.logical_sharding(mesh, cfg, ("act_batch", "act_seq")),
                 sharding.logical_sharding(mesh, cfg, ("act_batch",)), init_boxed, memory_sharding)


def init_state(setup: Setup, seed: int) -> dict:
    """Real, sharded parameters and optimizer state (created in place on their devices)."""
    init = jax.jit(lambda rng: nn.meta.unbox(setup.init_boxed(rng)), out_shardings=setup.state_shardings)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.rules(setup.cfg)):
        return init(jax.random.key(seed))


def memory_shardings(setup: Setup) -> dict:
    return setup.memory_sharding


def abstract_memory(setup: Setup, batch_size: int) -> dict:
    """The memory of `batch_size` rows as ShapeDtypeStructs with their shardings (derived once
    per batch size; `build` checked that the largest batch's memory fits)."""
    if batch_size not in setup.abstract_memories:
        shapes = jax.eval_shape(lambda: init_memory(setup.cfg.model, batch_size))
        shardings = memory_shardings(setup)
        abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), shapes, shardings)
        sharding.check_divisible(abstract, shardings, "memory")
        setup.abstract_memories[batch_size] = abstract
    return setup.abstract_memories[batch_size]


def device_memory_bytes() -> int:
    """Memory of one of this process's devices (the host's RAM for CPU devices)."""
    device = jax.local_devices()[0]  # memory_stats() answers only for this process's devices
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int((stats or {}).get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_parameters_fit(cfg: Config, mesh) -> None:
    """One-line error, before the parameters are traced, when the transformer weights with Adam's
    two moments (12 bytes per float32 parameter; the layers' and embedding's matrices, counted from
    the config: a lower bound) cannot fit on the devices."""
    m = cfg.model
    per_layer = 4 * m.d_model * m.num_heads * m.dim_per_head + 2 * m.d_model * m.d_ff
    total = 12 * (m.num_layers * per_layer + m.padded_vocab_size * m.d_model)
    limit = device_memory_bytes() * (mesh.size if jax.local_devices()[0].platform != "cpu" else 1)
    if total > 0.9 * limit:
        raise ConfigError(f"the parameters and their optimizer state alone need at least {total / 2**30:,.1f} GiB "
                          f"({m.num_layers:,} layers of d_model {m.d_model}, d_ff {m.d_ff}) but the devices have "
                          f"{limit / 2**30:,.1f} GiB; lower model.num_layers, model.d_model or model.d_ff")


def check_memory_fits(cfg: Config, mesh, batch_size: int) -> None:
    """One-line error when the memory state alone would not fit on the devices."""
    total = model_memory.state_bytes(cfg.model, batch_size)
    per_device = total / mesh.size  # best case: spread over every device
    limit = device_memory_bytes()
    if per_device > 0.9 * limit:
        raise ConfigError(
            f"the memory state needs {total / 2**30:.1f} GiB ({per_device / 2**30:.1f} GiB per device) but a "
            f"device has {limit / 2**30:.1f} GiB; lower model.knn.size, data.batch_size or use model.knn.dtype=bfloat16")


def init_memory_sharded(setup: Setup, batch_size: int) -> dict:
    abstract = abstract_memory(setup, batch_size)
    make = jax.jit(lambda: init_memory(setup.cfg.model, batch_size),
                   out_shardings=jax.tree.map(lambda v: v.sharding, abstract))
    return make()


def batch_shardings(setup: Setup) -> dict:
    return batch_layout.shardings(setup.batch_sharding, setup.row_sharding)


def device_batch(setup: Setup, batch: dict) -> dict:
    """This process's rows (numpy) -> global arrays sharded over the data axes."""
    shardings = batch_shardings(setup)
    return {key: jax.make_array_from_process_local_data(shardings[key], value)
            for key, value in batch_layout.complete(batch).items()}
