"""The top memory's state: pure functions over its pytree.

  top_BMD   the top layer's last M outputs of the row's document, oldest first, right-aligned
  length_B  how many of the M slots hold real tokens (the newest `length` slots)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory import slots

LOGICAL_AXES = {"top": ("act_batch", "act_mem", "act_embed"), "length": ("act_batch",)}


def init_for(cfg, batch_size: int) -> dict:
    return {"top": jnp.zeros((batch_size, cfg.mem_len, cfg.d_model), jnp.dtype(cfg.dtype)),
            "length": jnp.zeros((batch_size,), jnp.int32)}


def reset_rows(state: dict, reset_B: jax.Array) -> dict:
    """A row that starts a document forgets the previous one: O(B), the buffer is not touched."""
    return {**state, "length": jnp.where(reset_B, 0, state["length"])}


def valid_mask(state: dict) -> jax.Array:
    """[B, M] bool: the slots that hold outputs of the row's current document."""
    return slots.valid(state["length"], state["top"].shape[1])


def write(state: dict, out_BND: jax.Array, num_valid_B: jax.Array) -> dict:
    """Appends each row's first `num_valid[b]` outputs (never padding); keeps the newest M."""
    top = slots.append(state["top"], lax.stop_gradient(out_BND), num_valid_B, batch_axis=0, axis=1)
    return {"top": top, "length": jnp.minimum(state["length"] + num_valid_B, top.shape[1]).astype(jnp.int32)}


def attended_rows(cfg, seq_len: int) -> int:
    return cfg.mem_len + seq_len


def extra_activation_bytes(cfg, batch: int, seq_len: int) -> int:
    return 0
