"""Transformer-XL recurrence memory as explicit state (spec §1).

State, per row `b` (all leaves stop-gradient'ed, carried between segments):
  hidden_LBMD  the last M *input hidden states* of every layer, oldest first, right-aligned
  length_B     how many of the M slots hold real tokens (the newest `length` slots)

Slot `m` of row `b` is valid iff `m >= M - length[b]`. Resetting a row sets its length to 0:
O(B), never touching the M x D buffer. Padding is never written: `write` appends only the first
`num_valid[b]` positions of the segment (valid positions are a prefix of each row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory import slots

LOGICAL_AXES = {"hidden": ("layers", "act_batch", "act_mem", "act_embed"), "length": ("act_batch",)}


def init(num_layers: int, batch_size: int, mem_len: int, d_model: int, dtype=jnp.float32) -> dict:
    return {
        "hidden": jnp.zeros((num_layers, batch_size, mem_len, d_model), dtype),
        "length": jnp.zeros((batch_size,), jnp.int32),
    }


def init_for(cfg, batch_size: int) -> dict:
    """The state for a ModelConfig (`cfg.mem_len` slots per layer; 0: Transformer+RPE)."""
    return init(cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model, jnp.dtype(cfg.dtype))


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    """Empties the memory of the rows whose `reset` flag is set (a document starts there)."""
    return {**memory, "length": jnp.where(reset_B, 0, memory["length"])}


def valid_mask(memory: dict) -> jax.Array:
    """[B, M] bool: which memory slots hold tokens of the row's current document."""
    return slots.valid(memory["length"], memory["hidden"].shape[2])


def write(memory: dict, layer_inputs_LBND: jax.Array, num_valid_B: jax.Array) -> dict:
    """FIFO append of each row's first `num_valid[b]` positions; keeps the newest M."""
    mem_len = memory["hidden"].shape[2]
    hidden = slots.append(memory["hidden"], lax.stop_gradient(layer_inputs_LBND), num_valid_B, batch_axis=1, axis=2)
    length = jnp.minimum(memory["length"] + num_valid_B, mem_len).astype(jnp.int32)
    return {"hidden": hidden, "length": length}


def attended_rows(cfg, seq_len: int) -> int:
    """Keys each query of a segment attends to in a layer (memtx.fit's estimate)."""
    return cfg.mem_len + seq_len


def extra_activation_bytes(cfg, batch: int, seq_len: int) -> int:
    """Per layer, what the train step keeps beyond an XL layer's (memtx.fit's estimate)."""
    return 0
