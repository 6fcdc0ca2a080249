"""Compressive Transformer memory as explicit state (Rae et al. 2020).

Per layer, a FIFO memory of the last M layer inputs exactly as memory/xl/state.py, plus a compressed memory of
Mc slots: the slots the FIFO evicts are compressed `rate` (c) to one (memtx/memory/compressive/layers.py
holds the compression functions) and appended to it, oldest dropped. The layer attends over
[compressed ; memory ; segment].

State, per row `b` (all leaves stop-gradient'ed, carried between segments):
  hidden_LBMD        the FIFO memory (as memory/xl/state.py), right-aligned; `length_B` slots valid
  compressed_LBCD    the compressed memory, right-aligned; `compressed_length_B` slots valid

A segment of N positions, n valid (a prefix), evicts e = max(0, length + n - M) slots, the oldest.
`evicted` returns them as a block of N positions whose valid ones are its last e (the block
ends where the kept window starts), so the block splits into N / c groups of c neighbours of
which the last ceil(e / c) hold evicted slots: those are the compressed slots written. Within a
document every segment but the last is full, so e is N or 0 once the FIFO is full (M a multiple of
N) and every compressed slot summarises exactly c slots. Resets set both lengths to 0 (O(B)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory import slots
from memtx.memory.xl import state as xl

LOGICAL_AXES = {"hidden": ("layers", "act_batch", "act_mem", "act_embed"), "length": ("act_batch",),
                "compressed": ("layers", "act_batch", "act_mem", "act_embed"), "compressed_length": ("act_batch",)}


def init(num_layers: int, batch_size: int, mem_len: int, comp_len: int, d_model: int, dtype=jnp.float32) -> dict:
    return {**xl.init(num_layers, batch_size, mem_len, d_model, dtype),
            "compressed": jnp.zeros((num_layers, batch_size, comp_len, d_model), dtype),
            "compressed_length": jnp.zeros((batch_size,), jnp.int32)}


def init_for(cfg, batch_size: int) -> dict:
    return init(cfg.num_layers, batch_size, cfg.mem_len, cfg.compressive.size, cfg.d_model, jnp.dtype(cfg.dtype))


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    return {**memory, "length": jnp.where(reset_B, 0, memory["length"]),
            "compressed_length": jnp.where(reset_B, 0, memory["compressed_length"])}


def valid_mask(memory: dict) -> jax.Array:
    """[B, Mc + M] bool over [compressed ; memory]."""
    compressed_BC = slots.valid(memory["compressed_length"], memory["compressed"].shape[2])
    return jnp.concatenate([compressed_BC, xl.valid_mask(memory)], axis=1)


def rows(memory: dict) -> jax.Array:
    """[L, B, Mc + M, D]: what each layer attends to before its segment."""
    return jnp.concatenate([memory["compressed"], memory["hidden"]], axis=2)


def evicted(memory: dict, layer_inputs_LBND: jax.Array, num_valid_B: jax.Array):
    """What a write of this segment pushes out of the FIFO: ([L, B, N, D] block, [B, N] valid),
    the valid positions last (see the module docstring). The block is slots n-N .. n-1 of
    [memory ; segment]: memory slots, or (when M < n) segment positions the FIFO cannot keep."""
    hidden = memory["hidden"]
    L, B, M, D = hidden.shape
    N = layer_inputs_LBND.shape[2]
    padded = jnp.concatenate([jnp.zeros((L, B, N, D), hidden.dtype), hidden,
                              lax.stop_gradient(layer_inputs_LBND).astype(hidden.dtype)], axis=2)
    block_LBND = slots.window(padded, num_valid_B, N, batch_axis=1, axis=2)
    count_B = jnp.maximum(memory["length"] + num_valid_B - M, 0)
    return block_LBND, slots.valid(count_B, N)


def write(memory: dict, layer_inputs_LBND: jax.Array, groups_LBGD: jax.Array | None, num_groups_B: jax.Array | None,
          num_valid_B: jax.Array) -> dict:
    """FIFO append of the segment (as xl.write), and of each row's last `num_groups[b]` compressed
    groups to the compressed memory, which keeps its newest Mc slots (groups None, or Mc = 0:
    the compressed memory stays as it is)."""
    fifo = xl.write({"hidden": memory["hidden"], "length": memory["length"]}, layer_inputs_LBND, num_valid_B)
    comp = memory["compressed"]
    L, B, C, D = comp.shape
    if groups_LBGD is None or C == 0:
        return {**memory, **fifo}
    G = groups_LBGD.shape[2]
    groups_LBGD = lax.stop_gradient(groups_LBGD).astype(comp.dtype)
    # slot i of the result is old slot ng + i while i < C - ng, else group G - C + i (independent of ng)
    head = slots.window(jnp.concatenate([comp, jnp.zeros_like(comp)], axis=2), num_groups_B, C, batch_axis=1, axis=2)
    tail = jnp.concatenate([jnp.zeros((L, B, max(C - G, 0), D), comp.dtype), groups_LBGD], axis=2)[:, :, -C:]
    from_old_BC = ~slots.valid(num_groups_B, C)
    compressed = jnp.where(from_old_BC[None, :, :, None], head, tail)
    return {**fifo, "compressed": compressed,
            "compressed_length": jnp.minimum(memory["compressed_length"] + num_groups_B, C).astype(jnp.int32)}


def attended_rows(cfg, seq_len: int) -> int:
    """Keys each query of a segment attends to in a layer (memtx.fit's estimate)."""
    return cfg.compressive.size + cfg.mem_len + seq_len


def extra_activation_bytes(cfg, batch: int, seq_len: int) -> int:
    """Per layer: the reconstruction loss's two content attentions over N evicted slots."""
    return 4 * batch * cfg.num_heads * seq_len * seq_len * 4
