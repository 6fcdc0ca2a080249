"""Memorizing Transformer kNN memory as explicit state (spec §3).

One non-differentiable store per (row, head): a FIFO ring buffer of `S` (key, value) pairs.

State (per memory layer):
  keys_BHSD, values_BHSD   stored (L2-normalised) keys and values, stop-gradient'ed
  pointer_B                next slot to write (ring position)
  count_B                  how many slots hold entries of the row's current document

After a reset a row writes from slot 0, so its valid slots are exactly `slot < count`. Resetting
touches two integers per row (never the S x D buffers). The slot axis is never sharded: lookups
need no cross-device traffic.

Search backends, all behind `lookup`:
  exact    `lax.top_k` over all slots
  approx   `lax.approx_max_k` with a recall target (approximate on TPU; exact elsewhere)
  chunked  a scan over slot chunks keeping a running top-k (exact; memory O(N x chunk), so
           262K-slot memories do not materialise an N x S score matrix at once)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("exact", "approx", "chunked")
LOGICAL_AXES = {"keys": ("act_batch", "act_heads", "act_mem", "act_kv"),
                "values": ("act_batch", "act_heads", "act_mem", "act_kv"),
                "pointer": ("act_batch",), "count": ("act_batch",)}
NEG_INF = -1e30


def init(batch_size: int, num_heads: int, size: int, head_dim: int, dtype=jnp.float32) -> dict:
    return {
        "keys": jnp.zeros((batch_size, num_heads, size, head_dim), dtype),
        "values": jnp.zeros((batch_size, num_heads, size, head_dim), dtype),
        "pointer": jnp.zeros((batch_size,), jnp.int32),
        "count": jnp.zeros((batch_size,), jnp.int32),
    }


def state_bytes(batch_size: int, num_heads: int, size: int, head_dim: int, dtype) -> int:
    """Bytes of one layer's store (keys + values), for checks before allocating."""
    return 2 * batch_size * num_heads * size * head_dim * jnp.dtype(dtype).itemsize


def reset_rows(memory: dict, reset_B: jax.Array) -> dict:
    """Empties the rows starting a document: O(B), the buffers are left as they are."""
    zero = jnp.zeros_like(memory["count"])
    return {**memory, "pointer": jnp.where(reset_B, zero, memory["pointer"]),
            "count": jnp.where(reset_B, zero, memory["count"])}


def write(memory: dict, keys_BNHD: jax.Array, values_BNHD: jax.Array, num_valid_B: jax.Array) -> dict:
    """Appends each row's first `num_valid[b]` positions to its ring buffer (padding is never written).

    Only the newest `S` positions of a segment can survive, so older ones are not written at all:
    every slot is written at most once per call and the scatter has no duplicate indices.
    """
    B, H, S, D = memory["keys"].shape
    N = keys_BNHD.shape[1]
    position_N = jnp.arange(N)
    keep_BN = (position_N[None, :] < num_valid_B[:, None]) & (position_N[None, :] >= num_valid_B[:, None] - S)
    slot_BN = (memory["pointer"][:, None] + position_N[None, :]) % S
    slot_BN = jnp.where(keep_BN, slot_BN, S)  # out of range: dropped by the scatter
    rows_B1 = jnp.arange(B)[:, None]
    new_keys = lax.stop_gradient(keys_BNHD).astype(memory["keys"].dtype)
    new_values = lax.stop_gradient(values_BNHD).astype(memory["values"].dtype)
    keys = memory["keys"].at[rows_B1, :, slot_BN].set(new_keys, mode="drop")
    values = memory["values"].at[rows_B1, :, slot_BN].set(new_values, mode="drop")
    return {"keys": keys, "values": values,
            "pointer": ((memory["pointer"] + num_valid_B) % S).astype(jnp.int32),
            "count": jnp.minimum(memory["count"] + num_valid_B, S).astype(jnp.int32)}


def _masked_scores(queries_BHND, keys_BHSD, count_B, slot_offset: int = 0):
    scores = jnp.einsum("bhnd,bhsd->bhns", queries_BHND, keys_BHSD.astype(queries_BHND.dtype),
                        preferred_element_type=jnp.float32)
    slot_S = slot_offset + jnp.arange(keys_BHSD.shape[2])
    valid_BS = slot_S[None, :] < count_B[:, None]
    return jnp.where(valid_BS[:, None, None, :], scores, NEG_INF)


def search(memory: dict, queries_BHND: jax.Array, k: int, backend: str = "exact",
           recall_target: float = 0.95, chunk_size: int = 4096):
    """Top-k slots by inner product -> (scores_BHNK, slots_BHNK, valid_BHNK).

    Empty slots score -inf before the top-k and come back with valid=False.
    """
    S = memory["keys"].shape[2]
    if backend in ("exact", "approx") or S <= chunk_size:
        scores = _masked_scores(queries_BHND, memory["keys"], memory["count"])
        if backend == "approx":
            top, slots = lax.approx_max_k(scores, k, recall_target=recall_target)
        else:
            top, slots = lax.top_k(scores, k)
    elif backend == "chunked":
        top, slots = _chunked_top_k(memory, queries_BHND, k, chunk_size)
    else:
        raise ValueError(f"unknown kNN search backend '{backend}' (one of {', '.join(BACKENDS)})")
    return top, slots, top > NEG_INF / 2


def _chunked_top_k(memory, queries_BHND, k, chunk_size):
    B, H, S, D = memory["keys"].shape
    num_chunks = math.ceil(S / chunk_size)
    pad = num_chunks * chunk_size - S
    keys = memory["keys"]
    if pad:
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, pad), (0, 0)))
    keys_CBHSD = keys.reshape(B, H, num_chunks, chunk_size, D).transpose(2, 0, 1, 3, 4)
    N = queries_BHND.shape[2]
    init = (jnp.full((B, H, N, k), NEG_INF, jnp.float32), jnp.zeros((B, H, N, k), jnp.int32))

    def merge(carry, chunk):
        index, keys_BHSD = chunk
        scores = _masked_scores(queries_BHND, keys_BHSD, memory["count"], index * chunk_size)
        top, slots = lax.top_k(scores, min(k, chunk_size))
        both_scores = jnp.concatenate([carry[0], top], axis=-1)
        both_slots = jnp.concatenate([carry[1], slots + index * chunk_size], axis=-1)
        best, which = lax.top_k(both_scores, k)
        return (best, jnp.take_along_axis(both_slots, which, axis=-1)), None

    (top, slots), _ = lax.scan(merge, init, (jnp.arange(num_chunks), keys_CBHSD))
    return top, slots


def gather(memory_values_BHSD: jax.Array, slots_BHNK: jax.Array) -> jax.Array:
    """Values of the retrieved slots: [B, H, N, k, D]."""
    B, H, N, K = slots_BHNK.shape
    flat = slots_BHNK.reshape(B, H, N * K)
    picked = jnp.take_along_axis(memory_values_BHSD, flat[..., None], axis=2)
    return picked.reshape(B, H, N, K, -1)
