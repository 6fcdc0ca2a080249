"""Block-Recurrent Transformer memory as explicit state (Hutchins et al. 2022).

Two memories, carried between segments (both stop-gradient'ed there; within a segment the
recurrent state's gradient flows from block to block, as the paper's, which truncates at its
segment boundary too):

  hidden_LBMD, length_B  every layer's last M inputs, exactly as memory/xl/state.py: the sliding window of the
                         first block of the next segment (later blocks attend to the blocks
                         before them in their segment)
  state_BSD              the recurrent layer's S state vectors after the last block written
  blocks_B               how many blocks of the current document the state has absorbed; 0: the
                         layer reads its learned initial state instead of `state` (so a reset is
                         O(B), as for the XL memory, and needs no parameters)

A block with no valid position (padding only) leaves the state as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory.xl import state as xl

LOGICAL_AXES = {**xl.LOGICAL_AXES, "state": ("act_batch", None, "act_embed"), "blocks": ("act_batch",)}


def init(num_layers: int, batch_size: int, mem_len: int, state_size: int, d_model: int, dtype=jnp.float32) -> dict:
    return {**xl.init(num_layers, batch_size, mem_len, d_model, dtype),
            "state": jnp.zeros((batch_size, state_size, d_model), dtype),
            "blocks": jnp.zeros((batch_size,), jnp.int32)}


def init_for(cfg, batch_size: int) -> dict:
    return init(cfg.num_layers, batch_size, cfg.mem_len, cfg.block_recurrent.state_size, cfg.d_model,
                jnp.dtype(cfg.dtype))


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    return {**xl.reset_rows(memory, reset_B), "blocks": jnp.where(reset_B, 0, memory["blocks"])}


def valid_mask(memory: dict) -> jax.Array:
    """[B, M]: the XL slots (the state vectors are always read)."""
    return xl.valid_mask(memory)


def read_state(memory: dict, initial_SD: jax.Array) -> jax.Array:
    """[B, S, D]: the state each row's first block reads (the initial state where none is written)."""
    fresh_B = memory["blocks"] == 0
    return jnp.where(fresh_B[:, None, None], initial_SD.astype(memory["state"].dtype)[None], memory["state"])


def write(memory: dict, layer_inputs_LBND: jax.Array, state_BSD: jax.Array, num_blocks_B: jax.Array,
          num_valid_B: jax.Array) -> dict:
    """The XL append of the segment, and the state after its last block holding a valid position
    (`num_blocks[b]` of them; 0 leaves the row's state as it is)."""
    fifo = xl.write({"hidden": memory["hidden"], "length": memory["length"]}, layer_inputs_LBND, num_valid_B)
    wrote_B = num_blocks_B > 0
    state = jnp.where(wrote_B[:, None, None], lax.stop_gradient(state_BSD).astype(memory["state"].dtype),
                      memory["state"])
    return {**fifo, "state": state, "blocks": memory["blocks"] + num_blocks_B.astype(jnp.int32)}


def attended_rows(cfg, seq_len: int) -> int:
    """Keys each query attends to in a layer (memtx.fit's estimate): its window and its block, and
    in the recurrent layer the state."""
    return cfg.mem_len + cfg.block_recurrent.block_len + cfg.block_recurrent.state_size


def extra_activation_bytes(cfg, batch: int, seq_len: int) -> int:
    """Per layer (the recurrent one's, spread): each block's state rows, their attention scores
    over the state and the block, and the state FFN."""
    br = cfg.block_recurrent
    blocks, S = -(-seq_len // br.block_len), br.state_size
    per_block = batch * S * (8 * cfg.d_model + cfg.d_ff) * 4 + 2 * batch * cfg.num_heads * S * (S + br.block_len) * 4
    return blocks * per_block // cfg.num_layers
