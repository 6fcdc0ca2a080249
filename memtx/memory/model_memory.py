"""The whole model's memory state: the XL cache of every layer plus a kNN store per memory layer,
or (model.memory_type = "lamemo") the LaMemo state.

    {"xl": xl state, "knn": {"<layer>": kNN state, ...}}   or   {"lamemo": lamemo state, "knn": {}}

These are the functions the train step, evaluation and generation share: init, reset the rows
that start a document, and the logical axes from which shardings are derived.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memtx.config import ModelConfig
from memtx.memory import knn, lamemo, xl


def init(cfg: ModelConfig, batch_size: int) -> dict:
    if cfg.memory_type == "lamemo":  # LaMemo excludes kNN memory (validate)
        return {"lamemo": lamemo.init(cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model, cfg.num_heads,
                                      cfg.dim_per_head, jnp.dtype(cfg.dtype)),
                "knn": {}}
    return {
        "xl": xl.init(cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model, jnp.dtype(cfg.dtype)),
        "knn": {str(layer): knn.init(batch_size, cfg.num_heads, cfg.knn.size, cfg.dim_per_head,
                                     jnp.dtype(cfg.knn.dtype))
                for layer in cfg.knn.layer_indices(cfg.num_layers)},
    }


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    if "lamemo" in memory:
        return {"lamemo": lamemo.reset_rows(memory["lamemo"], reset_B), "knn": {}}
    return {"xl": xl.reset_rows(memory["xl"], reset_B),
            "knn": {layer: knn.reset_rows(state, reset_B) for layer, state in memory["knn"].items()}}


def logical_axes(cfg: ModelConfig) -> dict:
    if cfg.memory_type == "lamemo":
        return {"lamemo": dict(lamemo.LOGICAL_AXES), "knn": {}}
    return {"xl": dict(xl.LOGICAL_AXES),
            "knn": {str(layer): dict(knn.LOGICAL_AXES) for layer in cfg.knn.layer_indices(cfg.num_layers)}}


def state_bytes(cfg: ModelConfig, batch_size: int) -> int:
    """Bytes of the whole memory state (all rows), to check against the devices before allocating."""
    if cfg.memory_type == "lamemo":
        return lamemo.state_bytes(cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model, cfg.num_heads,
                                  cfg.dim_per_head, cfg.dtype)
    xl_bytes = cfg.num_layers * batch_size * cfg.mem_len * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    knn_bytes = len(cfg.knn.layer_indices(cfg.num_layers)) * knn.state_bytes(
        batch_size, cfg.num_heads, cfg.knn.size, cfg.dim_per_head, cfg.knn.dtype)
    return xl_bytes + knn_bytes
