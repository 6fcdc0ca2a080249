"""Memorizing Transformer kNN memory as explicit state (spec §3).

One non-differentiable store per (row, head): a FIFO ring buffer of `S` (key, value) pairs.

State (per memory layer):
  keys_BHSD, values_BHSD   stored (L2-normalised) keys and values, stop-gradient'ed
  pointer_B                next slot to write (ring position)
  count_B                  how many slots hold entries of the row's current document

After a reset a row writes from slot 0, so its valid slots are exactly `slot < count`. Resetting
touches two integers per row (never the S x D buffers). The slot axis is never sharded: lookups
need no cross-device traffic.

Stores: float32, bfloat16, or int8 keys (the keys are L2-normalised, so each component is
stored as round(127 x) in [-127, 127]) with bfloat16 values.

Search backends, all behind `search`:
  exact     `lax.top_k` over the whole queries x slots score matrix (the reference)
  approx    `lax.approx_max_k` with a recall target: approximate on TPU (the TPU default); on CPU
            and GPU it lowers to the same full sort as `exact`
  blocked   exact, two passes over tiles of `chunk_size` slots, never holding the whole score
            matrix: (1) the maximum of every bucket of `bucket_size` consecutive slots; (2) the k
            buckets with the largest maxima hold the top k (an entry outside them would have k
            bucket maxima above it), so their scores are gathered from the recomputed tiles and
            the top k of those k x bucket_size candidates is the answer. The same neighbours in
            the same order as exact, ties included (candidates are kept in slot order); a tile's
            matmul may round a score differently in its last bit, which can only swap two
            neighbours whose scores differ by that rounding
  bucketed  approximate: slot s falls in bucket s mod L; one winner per bucket (its maximum),
            then the top k of the L winners. A true neighbour is lost only when a better one shares
            its bucket, so the expected recall is about 1 - (k-1)/(2L); L is the smallest power of
            two meeting `recall_target` (the partial reduction approx_max_k does on TPU)
  chunked   exact: a scan over slot chunks keeping a running top-k (the first tiled backend)
  auto      by platform and store size (`resolve_backend`): approx on TPU; elsewhere exact up to
            AUTO_EXACT_MAX_SLOTS slots and blocked above (exact neighbours on CPU and GPU)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memtx.memory.knn_choices import BACKENDS, EXACT_BACKENDS, STORE_DTYPES, TILED_BACKENDS  # noqa: F401

INT8_SCALE = 127.0  # int8 keys: round(127 x) of the unit-norm key's components
LOGICAL_AXES = {"keys": ("act_batch", "act_heads", "act_mem", "act_kv"),
                "values": ("act_batch", "act_heads", "act_mem", "act_kv"),
                "pointer": ("act_batch",), "count": ("act_batch",)}
NEG_INF = -1e30
# auto off TPU: the whole score matrix up to this many slots, blocked above. On this project's CPU
# the default kNN preset's train step is faster with exact at 8K slots (README, Speed) and its
# lookup faster with blocked from 16K on.
AUTO_EXACT_MAX_SLOTS = 8192


def resolve_backend(backend: str, num_slots: int, platform: str | None = None) -> str:
    """The backend `auto` stands for on `platform` (default: JAX's default backend): `approx` on TPU,
    where approx_max_k is approximate and fast; elsewhere, where it is a full sort, `exact` up to
    AUTO_EXACT_MAX_SLOTS slots and `blocked` above. Other backends stand for themselves."""
    if backend != "auto":
        return backend
    if (platform or jax.default_backend()) == "tpu":
        return "approx"
    return "exact" if num_slots <= AUTO_EXACT_MAX_SLOTS else "blocked"


def store_dtypes(dtype) -> tuple:
    """(key dtype, value dtype) of a store kind: float32, bfloat16, or int8 keys + bfloat16 values."""
    dtype = jnp.dtype(dtype)
    return (dtype, jnp.dtype(jnp.bfloat16)) if dtype == jnp.int8 else (dtype, dtype)


def init(batch_size: int, num_heads: int, size: int, head_dim: int, dtype=jnp.float32) -> dict:
    key_dtype, value_dtype = store_dtypes(dtype)
    return {
        "keys": jnp.zeros((batch_size, num_heads, size, head_dim), key_dtype),
        "values": jnp.zeros((batch_size, num_heads, size, head_dim), value_dtype),
        "pointer": jnp.zeros((batch_size,), jnp.int32),
        "count": jnp.zeros((batch_size,), jnp.int32),
    }


def state_bytes(batch_size: int, num_heads: int, size: int, head_dim: int, dtype) -> int:
    """Bytes of one layer's store (keys + values), for checks before allocating."""
    key_dtype, value_dtype = store_dtypes(dtype)
    return batch_size * num_heads * size * head_dim * (key_dtype.itemsize + value_dtype.itemsize)


def quantize_keys(keys, dtype):
    """Keys as the store keeps them (int8: round(127 x), x a unit vector's component)."""
    if jnp.dtype(dtype) == jnp.int8:
        return jnp.round(jnp.clip(keys.astype(jnp.float32), -1.0, 1.0) * INT8_SCALE).astype(jnp.int8)
    return keys.astype(dtype)


def stored_keys(keys_BHSD, dtype):
    """Stored keys (or gathered ones) as `dtype` floats: int8 keys are scaled back to unit norm."""
    if keys_BHSD.dtype == jnp.int8:
        return (keys_BHSD.astype(jnp.float32) / INT8_SCALE).astype(dtype)
    return keys_BHSD.astype(dtype)


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
    new_keys = quantize_keys(lax.stop_gradient(keys_BNHD), memory["keys"].dtype)
    new_values = lax.stop_gradient(values_BNHD).astype(memory["values"].dtype)
    keys = memory["keys"].at[rows_B1, :, slot_BN].set(new_keys, mode="drop")
    values = memory["values"].at[rows_B1, :, slot_BN].set(new_values, mode="drop")
    return {**memory, "keys": keys, "values": values,
            "pointer": ((memory["pointer"] + num_valid_B) % S).astype(jnp.int32),
            "count": jnp.minimum(memory["count"] + num_valid_B, S).astype(jnp.int32)}


def _score_dtype(queries, keys):
    """Low-precision stores are scored in bfloat16 (float32 accumulation): half the bytes read."""
    return jnp.bfloat16 if keys.dtype in (jnp.bfloat16, jnp.int8) else queries.dtype


def _masked_scores(queries_BHND, keys_BHSD, count_B, slot_offset=0):
    """[B, H, N, S] float32 inner products; slots at or past the row's count score NEG_INF."""
    dtype = _score_dtype(queries_BHND, keys_BHSD)
    scores = jnp.einsum("bhnd,bhsd->bhns", queries_BHND.astype(dtype), keys_BHSD.astype(dtype),
                        preferred_element_type=jnp.float32)
    if keys_BHSD.dtype == jnp.int8:
        scores = scores * (1.0 / INT8_SCALE)
    slot_S = slot_offset + jnp.arange(keys_BHSD.shape[2])
    valid_BS = slot_S[None, :] < count_B[:, None]
    return jnp.where(valid_BS[:, None, None, :], scores, NEG_INF)


def search(memory: dict, queries_BHND: jax.Array, k: int, backend: str = "exact",
           recall_target: float = 0.95, chunk_size: int = 4096, bucket_size: int = 16):
    """Top-k slots by inner product -> (scores_BHNK, slots_BHNK, valid_BHNK).

    Empty slots score -inf before the top-k and come back with valid=False.
    """
    S = memory["keys"].shape[2]
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN search backend '{backend}' (one of {', '.join(BACKENDS)})")
    backend = resolve_backend(backend, S)
    if backend == "blocked" and S // bucket_size > k:
        top, slots = _blocked_top_k(memory, queries_BHND, k, chunk_size, bucket_size)
    elif backend == "bucketed" and S > bucket_count(k, recall_target):
        top, slots = _bucketed_top_k(memory, queries_BHND, k, chunk_size, bucket_count(k, recall_target))
    elif backend == "chunked" and S > chunk_size:
        top, slots = _chunked_top_k(memory, queries_BHND, k, chunk_size)
    else:  # exact, approx, and stores too small for a tiled backend to save anything
        scores = _masked_scores(queries_BHND, memory["keys"], memory["count"])
        if backend == "approx":
            top, slots = lax.approx_max_k(scores, k, recall_target=recall_target)
        else:
            top, slots = lax.top_k(scores, k)
    valid = top > NEG_INF / 2
    return top, jnp.where(valid, slots, 0), valid  # an invalid slot may lie in a tile's padding


def bucket_count(k: int, recall_target: float) -> int:
    """Buckets L of the `bucketed` backend: the smallest power of two with 1 - (k-1)/(2L) >= target."""
    if recall_target >= 1.0:
        return 1 << 62  # never: exact
    return 1 << max(0, math.ceil(math.log2(max(1.0, (k - 1) / (2 * (1 - recall_target))))))


def _tiles(keys_BHSD, tile: int):
    """Slot tiles [T, B, H, tile, D] (the last one padded: its slots lie past every count)."""
    B, H, S, D = keys_BHSD.shape
    num_tiles = math.ceil(S / tile)
    if num_tiles * tile > S:
        keys_BHSD = jnp.pad(keys_BHSD, ((0, 0), (0, 0), (0, num_tiles * tile - S), (0, 0)))
    return jnp.moveaxis(keys_BHSD.reshape(B, H, num_tiles, tile, D), 2, 0)


def _blocked_top_k(memory, queries_BHND, k, chunk_size, bucket_size):
    B, H, S, D = memory["keys"].shape
    N, b = queries_BHND.shape[2], bucket_size
    tile = min(math.ceil(chunk_size / b), math.ceil(S / b)) * b  # whole buckets per tile
    per_tile = tile // b
    tiles = _tiles(memory["keys"], tile)
    index_T = jnp.arange(tiles.shape[0])

    def scores_of(t, keys_BHCD):  # [B, H, N, buckets in the tile, b]
        return _masked_scores(queries_BHND, keys_BHCD, memory["count"], t * tile).reshape(B, H, N, per_tile, b)

    # Pass 1: every bucket's maximum.
    _, maxima = lax.scan(lambda _, x: (None, scores_of(*x).max(-1)), None, (index_T, tiles))
    maxima_BHNU = jnp.moveaxis(maxima, 0, 3).reshape(B, H, N, -1)
    _, buckets_BHNK = lax.top_k(maxima_BHNU, k)
    buckets_BHNK = jnp.sort(buckets_BHNK, axis=-1)  # slot order: ties resolve as lax.top_k's do

    # Pass 2: the chosen buckets' scores, from the same tiles computed again.
    def collect(candidates, x):
        t, keys_BHCD = x
        local = buckets_BHNK - t * per_tile
        inside = (local >= 0) & (local < per_tile)
        picked = jnp.take_along_axis(scores_of(t, keys_BHCD), jnp.clip(local, 0, per_tile - 1)[..., None], axis=3)
        return jnp.where(inside[..., None], picked, candidates), None

    candidates, _ = lax.scan(collect, jnp.full((B, H, N, k, b), NEG_INF, jnp.float32), (index_T, tiles))
    top, which = lax.top_k(candidates.reshape(B, H, N, k * b), k)
    slots = (buckets_BHNK[..., None] * b + jnp.arange(b)).reshape(B, H, N, k * b)
    return top, jnp.take_along_axis(slots, which, axis=-1)


def _bucketed_top_k(memory, queries_BHND, k, chunk_size, num_buckets):
    B, H, S, D = memory["keys"].shape
    N, L = queries_BHND.shape[2], num_buckets
    tile = max(chunk_size // L, 1) * L  # slot s of a tile lands in bucket s mod L
    tiles = _tiles(memory["keys"], tile)

    def merge(best, x):
        t, keys_BHCD = x
        scores = _masked_scores(queries_BHND, keys_BHCD, memory["count"], t * tile).reshape(B, H, N, tile // L, L)
        top_BHNL, row_BHNL = scores.max(3), jnp.argmax(scores, axis=3).astype(jnp.int32)
        better = top_BHNL > best[0]
        slot_BHNL = t * tile + row_BHNL * L + jnp.arange(L, dtype=jnp.int32)
        return (jnp.where(better, top_BHNL, best[0]), jnp.where(better, slot_BHNL, best[1])), None

    init = (jnp.full((B, H, N, L), NEG_INF, jnp.float32), jnp.zeros((B, H, N, L), jnp.int32))
    (winners, slots), _ = lax.scan(merge, init, (jnp.arange(tiles.shape[0]), tiles))
    top, which = lax.top_k(winners, k)
    return top, jnp.take_along_axis(slots, which, axis=-1)


def _chunked_top_k(memory, queries_BHND, k, chunk_size):
    B, H, N = memory["keys"].shape[0], memory["keys"].shape[1], queries_BHND.shape[2]
    tiles = _tiles(memory["keys"], chunk_size)
    init = (jnp.full((B, H, N, k), NEG_INF, jnp.float32), jnp.zeros((B, H, N, k), jnp.int32))

    def merge(carry, x):
        t, keys_BHCD = x
        scores = _masked_scores(queries_BHND, keys_BHCD, memory["count"], t * chunk_size)
        top, slots = lax.top_k(scores, min(k, chunk_size))
        both_scores = jnp.concatenate([carry[0], top], axis=-1)
        both_slots = jnp.concatenate([carry[1], slots + t * chunk_size], axis=-1)
        best, which = lax.top_k(both_scores, k)
        return (best, jnp.take_along_axis(both_slots, which, axis=-1)), None

    (top, slots), _ = lax.scan(merge, init, (jnp.arange(tiles.shape[0]), tiles))
    return top, slots


def recall(reference, got) -> float:
    """Recall@k of a search result against a reference one (both `search` outputs): the mean over
    queries with a valid reference neighbour of the fraction of those neighbours that came back.
    Host-side (NumPy), for tests and benchmarks."""
    ref_slots, ref_valid, slots, valid = (np.asarray(a) for a in (reference[1], reference[2], got[1], got[2]))
    k = ref_slots.shape[-1]
    hits = [len(set(a[va]) & set(b[vb])) / va.sum()
            for a, va, b, vb in zip(ref_slots.reshape(-1, k), ref_valid.reshape(-1, k), slots.reshape(-1, k),
                                    valid.reshape(-1, k)) if va.any()]
    return float(np.mean(hits))


def gather(memory_values_BHSD: jax.Array, slots_BHNK: jax.Array) -> jax.Array:
    """Values of the retrieved slots: [B, H, N, k, D]."""
    B, H, N, K = slots_BHNK.shape
    flat = slots_BHNK.reshape(B, H, N * K)
    picked = jnp.take_along_axis(memory_values_BHSD, flat[..., None], axis=2)
    return picked.reshape(B, H, N, K, -1)
