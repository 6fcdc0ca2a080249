"""LaMemo look-ahead memory as explicit state (spec §2).

State, per row `b` (all leaves stop-gradient'ed, carried between segments):
  emb_BMD      the scaled input embeddings of the last M tokens (layer 0's memory input)
  C_LBMHD      per layer, each memory position's current attention output (before W_O)
  logS_LBMH    per layer, the log of each memory position's accumulated softmax denominator;
               always float32, whatever the compute dtype
  length_B     how many of the M slots hold real tokens (the newest `length` slots)

Slots are right-aligned exactly as in memory/xl/state.py: slot `m` of row `b` is valid iff
`m >= M - length[b]`, and resetting a row only sets its length to 0 (O(B)). Invalid slots keep
finite junk which the attention masks. Padding is never written (`write` keeps the M slots ending
right after each row's last valid position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory import slots

LOGICAL_AXES = {
    "emb": ("act_batch", "act_mem", "act_embed"),
    "C": ("layers", "act_batch", "act_mem", "act_heads", "act_kv"),
    "logS": ("layers", "act_batch", "act_mem", "act_heads"),
    "length": ("act_batch",),
}


def init(num_layers: int, batch_size: int, mem_len: int, d_model: int, num_heads: int, head_dim: int,
         dtype=jnp.float32) -> dict:
    return {
        "emb": jnp.zeros((batch_size, mem_len, d_model), dtype),
        "C": jnp.zeros((num_layers, batch_size, mem_len, num_heads, head_dim), dtype),
        "logS": jnp.zeros((num_layers, batch_size, mem_len, num_heads), jnp.float32),
        "length": jnp.zeros((batch_size,), jnp.int32),
    }


def init_for(cfg, batch_size: int) -> dict:
    return init(cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model, cfg.num_heads, cfg.dim_per_head,
                jnp.dtype(cfg.dtype))


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    """Empties the memory of the rows whose `reset` flag is set (a document starts there)."""
    return {**memory, "length": jnp.where(reset_B, 0, memory["length"])}


def valid_mask(memory: dict) -> jax.Array:
    """[B, M] bool: which memory slots hold tokens of the row's current document."""
    return slots.valid(memory["length"], memory["emb"].shape[1])


def write(memory: dict, emb_BND, refreshed_C_LBMHD, refreshed_logS_LBMH, cur_C_LBNHD, cur_logZ_LBNH,
          num_valid_B) -> dict:
    """New state after a segment (spec §2 step 5).

    emb: this segment's scaled embeddings; refreshed_*: the memory slots' interpolated C' and
    logS' (all M slots); cur_*: the current positions' attention outputs a and their logZ.
    Keeps the last M rows of [old/refreshed ; current] up to each row's last valid position. A row
    with no valid position (all padding) keeps its state unchanged: its refresh looked at padding.
    """
    mem_len = memory["emb"].shape[1]
    sg = lax.stop_gradient
    emb = slots.append(memory["emb"], sg(emb_BND), num_valid_B, batch_axis=0, axis=1)
    C = slots.append(sg(refreshed_C_LBMHD).astype(memory["C"].dtype), sg(cur_C_LBNHD), num_valid_B, batch_axis=1, axis=2)
    logS = slots.append(sg(refreshed_logS_LBMH).astype(jnp.float32), sg(cur_logZ_LBNH), num_valid_B,
                        batch_axis=1, axis=2)
    any_valid_B = num_valid_B > 0

    def pick(new, old, batch_axis):  # keep `old` for rows without any valid position
        other_axes = [a for a in range(new.ndim) if a != batch_axis]
        return jnp.where(jnp.expand_dims(any_valid_B, other_axes), new, old)

    return {
        "emb": pick(emb, memory["emb"], 0),
        "C": pick(C, memory["C"], 1),
        "logS": pick(logS, memory["logS"], 1),
        "length": jnp.minimum(memory["length"] + num_valid_B, mem_len).astype(jnp.int32),
    }


def attended_rows(cfg, seq_len: int) -> int:
    """Keys each query of a segment attends to in a layer (memtx.fit's estimate)."""
    return cfg.mem_len + seq_len


def extra_activation_bytes(cfg, batch: int, seq_len: int) -> int:
    """Per layer: the look-ahead's scores and probabilities (float32)."""
    return 2 * batch * cfg.num_heads * cfg.mem_len * seq_len * 4
