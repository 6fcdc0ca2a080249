"""Transformer-XL relative multi-head attention over [memory ; current segment] (spec §1).

For query i (absolute position M+i) and key j the distance is d = M+i-j (masked when d < 0):

    score(i, j) = [ (q_i + u)·k_j + (q_i + v)·(W_R · sinusoid(d)) ] / sqrt(Dh)

The position term is computed once per distance and then moved to its keys: for a whole segment
by the pad-and-reshape "relative shift" (`relative_shift`: copies only, in the forward and the
backward pass), for the few rows of a generation step by a gather (`gather_by_distance`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.memory import knn

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig

NEG_INF = -1e30


def sinusoid(positions_K: jax.Array, d_model: int) -> jax.Array:
    """[K] positions -> [K, d_model]: the sin block then the cos block, freqs 1/10000^(2k/D)."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
    angles = positions_K.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def distance_sinusoid(distances_K: jax.Array, d_model: int, clamp_len: int = 0) -> jax.Array:
    """sinusoid of relative distances, those beyond `clamp_len` (> 0) encoded as `clamp_len`
    (Transformer-XL's clamp_len: longer memories at evaluation than in training); signs kept."""
    if clamp_len > 0:
        distances_K = jnp.sign(distances_K) * jnp.minimum(jnp.abs(distances_K), clamp_len)
    return sinusoid(distances_K, d_model)


def gather_by_distance(by_distance_BHNR: jax.Array, distance_NK: jax.Array) -> jax.Array:
    """[B, H, N, K]: entry (i, j) is by_distance[..., i, distance[i, j]], the per-distance term
    of query i at its distance to key j (distances outside 0..R-1 are clipped: mask them)."""
    N, R = by_distance_BHNR.shape[2], by_distance_BHNR.shape[3]
    return by_distance_BHNR[:, :, jnp.arange(N)[:, None], jnp.clip(distance_NK, 0, R - 1)]


def relative_shift(by_reversed_distance_BHNK: jax.Array, M: int) -> jax.Array:
    """[B, H, N, K], K = M + N: entry (i, j) is by_reversed_distance[..., i, K-1-d] at the distance
    d = M+i-j of query i to key j, for every j <= M+i (entries with j > M+i are other rows' values:
    mask them). Transformer-XL's relative shift: pad a zero column in front, view the [N, K+1]
    block as [K+1, N], drop the first row and view the rest as [N, K]; row i comes out shifted
    left by N-1-i. Unlike a gather, its gradient is a copy too (a gather's is a scatter-add)."""
    B, H, N, K = by_reversed_distance_BHNK.shape
    assert K == M + N, (K, M, N)
    padded = jnp.pad(by_reversed_distance_BHNK, ((0, 0), (0, 0), (0, 0), (1, 0)))
    return padded.reshape(B, H, K + 1, N)[:, :, 1:].reshape(B, H, N, K)


def xl_scores(qu_BNHD, qv_BNHD, k_BKHD, r_KHD, batched_positions: bool = True):
    """Transformer-XL's score of N queries, the last N of K rows [memory ; segment], over all K
    keys: [B, H, N, K] = (q+u)·k_j + (q+v)·r at distance d = K-N+i-j (the module docstring),
    with `qu`, `qv` the biased queries (scaled or not: the caller's choice) and `r_KHD` the
    projected position vectors of distances 0..K-1 (None: no position term). Entries of keys after
    a query (d < 0) hold other rows' values: mask them. RelativeAttention (per query block) and
    LaMemo's causal attention both score with it. `batched_positions=False` scores the position
    term as an unbatched matmul, as LaMemo always has: the same numbers up to the last bit, which
    keeps its losses and checkpoints bit for bit as they were."""
    B, N, H, Dh = qu_BNHD.shape
    K = k_BKHD.shape[1]
    ac_BHNK = jnp.einsum("bnhd,bkhd->bhnk", qu_BNHD, k_BKHD, preferred_element_type=jnp.float32)
    if r_KHD is None:  # no position term (model.knn.position_terms=false)
        return ac_BHNK
    if batched_positions:  # r broadcast over the batch: the same batched matmul as the content term (the
        # unbatched "bnhd,khd" form is laid out with a transpose that costs as much again on CPU)
        bd_BHNK = jnp.einsum("bnhd,bkhd->bhnk", qv_BNHD, jnp.broadcast_to(r_KHD[:K][::-1][None], (B, K, H, Dh)),
                             preferred_element_type=jnp.float32)
    else:
        bd_BHNK = jnp.einsum("bnhd,khd->bhnk", qv_BNHD, r_KHD[:K][::-1], preferred_element_type=jnp.float32)
    return ac_BHNK + relative_shift(bd_BHNK, K - N)


def dot_product_attention(q_BNHD, k_BKHD, v_BKHD, valid_BK=None):
    """Softmax(q.k / sqrt(Dh)) v without position terms: [B, N, H, Dh]; keys outside `valid_BK`
    are masked, and a query with no valid key reads zeros."""
    scores = jnp.einsum("bnhd,bkhd->bhnk", q_BNHD, k_BKHD, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q_BNHD.shape[-1]))
    if valid_BK is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        scores = jnp.where(valid_BK[:, None, None, :], scores, NEG_INF)
        probs = jnp.where(valid_BK[:, None, None, :], jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bhnk,bkhd->bnhd", probs.astype(v_BKHD.dtype), v_BKHD)


def softmax_attend(scores_BHNK, v_BKHD, dropout: float = 0.0, rng=None):
    """(softmax(scores), softmax(scores) @ v [B, N, H, Dh]); the product is normalised after the
    matmul (the division touches N x Dh numbers, not N x K), and the probabilities are computed
    only if the caller uses them. With `rng`, attention dropout at rate `dropout` (applied to the
    unnormalised weights: the same as to the probabilities). Every query row needs an unmasked key."""
    e_BHNK = jnp.exp(scores_BHNK - jax.lax.stop_gradient(scores_BHNK.max(-1, keepdims=True)))
    sum_BHN1 = e_BHNK.sum(-1, keepdims=True)
    weights = e_BHNK
    if rng is not None and dropout > 0:
        weights = jnp.where(jax.random.bernoulli(rng, 1.0 - dropout, e_BHNK.shape), e_BHNK / (1.0 - dropout), 0.0)
    out_BHND = jnp.einsum("bhnk,bkhd->bhnd", weights.astype(v_BKHD.dtype), v_BKHD,
                          preferred_element_type=jnp.float32) / sum_BHN1
    return e_BHNK / sum_BHN1, jnp.swapaxes(out_BHND, 1, 2).astype(v_BKHD.dtype)


def param_with_axes(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape)


def l2_normalize(x, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RelativeAttention(nn.Module):
    """Multi-head attention of the current segment over [memory ; segment], XL positions.

    With `knn_memory` (a Memorizing Transformer layer, spec §3) or `cfg.qk_norm` queries and keys
    are L2-normalised and a learned per-head scale replaces 1/sqrt(Dh); in a kNN layer each query
    (the normalised q, without u) also retrieves its top-k entries from the kNN store, attends over
    them with its own softmax, and a learned per-head gate mixes the two results.

    With `smear_keys` (Olsson et al. 2022, "In-context learning and induction heads") each head's
    key at position t is sigmoid(a) * k_t + (1 - sigmoid(a)) * k_{t-1}, with a learned per head
    (initially 0: half and half) and k_{t-1} the previous row of [memory ; segment] (zero before
    the first valid row). A key then also says which token came before it, so one layer can find
    "the position after the last occurrence of my token" (an induction head) without a
    previous-token head below it; in a kNN layer the store keeps the smeared keys.
    """

    cfg: ModelConfig
    smear_keys: bool = False

    @nn.compact
    def __call__(self, x_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic: bool = True,
                 knn_memory: dict | None = None, cache: dict | None = None, position=None):
        """Without `cache`: x is a whole segment (N rows). With `cache` (generation: the keys,
        values and position vectors of [memory ; segment] that an earlier call returned), x is the
        n rows at segment positions position..position+n-1; their keys and values are written into
        the cache and they attend over the cached positions before them. `knn_memory` is read
        only (the layer stack writes it). Returns (output, cache: keys, values and position
        vectors of [memory ; segment])."""
        cfg = self.cfg
        H, Dh, D = cfg.num_heads, cfg.dim_per_head, cfg.d_model
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        # A kNN layer may go without relative positions in its local attention (model.knn.position_terms,
        # meliad's disable_position_encoding_for_memory_layers): no r_proj, no position term.
        positions = knn_memory is None or cfg.knn.position_terms
        w_qkv = param_with_axes(self, "qkv", (D, 3, H, Dh), ("embed", "qkv", "heads", "kv"), init).astype(dtype)
        w_r = param_with_axes(self, "r_proj", (D, H, Dh), ("embed", "heads", "kv"), init).astype(dtype) \
            if positions else None
        w_o = param_with_axes(self, "out", (H, Dh, D), ("heads", "kv", "embed"), init).astype(dtype)

        B, N, _ = x_BND.shape  # with a cache, N is the number of new rows (the segment is longer)
        M = mem_BMD.shape[1]
        normalised = knn_memory is not None or cfg.qk_norm  # spec §3: normalised q, k, learned scale
        q_BNHD = jnp.einsum("bnd,dhk->bnhk", x_BND.astype(dtype), w_qkv[:, 0])
        # Keys and values of [memory ; segment], or with a cache of the new rows only.
        rows_in = x_BND.astype(dtype) if cache is not None else \
            jnp.concatenate([mem_BMD.astype(dtype), x_BND.astype(dtype)], axis=1)
        k_rows = jnp.einsum("bkd,dhe->bkhe", rows_in, w_qkv[:, 1])
        v_rows = jnp.einsum("bkd,dhe->bkhe", rows_in, w_qkv[:, 2])
        K = M + N if cache is None else cache["k"].shape[1]  # rows of [memory ; segment]
        key_valid_BK = jnp.concatenate([mem_valid_BM, jnp.ones((B, K - M), bool)], axis=1)
        raw_cache = {}
        if self.smear_keys:  # the new rows start at row 0, or at M + position with a cache
            k_rows, raw_cache = self.smear(k_rows, key_valid_BK, cache, 0 if cache is None else M + position)
        if normalised:
            k_rows = l2_normalize(k_rows)
        if cache is None:
            k_BKHD, v_BKHD = k_rows, v_rows
            # Position term, once per distance d = 0..K-1, then gathered to [N, K] by d = M+i-j.
            r_KHD = None if w_r is None else \
                jnp.einsum("kd,dhe->khe", distance_sinusoid(jnp.arange(K), D, cfg.clamp_len).astype(dtype), w_r)
        else:  # the new rows join the cached ones at M + position
            k_BKHD = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_rows.astype(cache["k"].dtype), M + position, 1)
            v_BKHD = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_rows.astype(cache["v"].dtype), M + position, 1)
            r_KHD = cache["r"]
        q_BNHD = nn.with_logical_constraint(q_BNHD, ("act_batch", "act_seq", "act_heads", "act_kv"))
        k_BKHD = nn.with_logical_constraint(k_BKHD, ("act_batch", "act_seq", "act_heads", "act_kv"))
        v_BKHD = nn.with_logical_constraint(v_BKHD, ("act_batch", "act_seq", "act_heads", "act_kv"))
        if normalised:
            q_BNHD = l2_normalize(q_BNHD)
            # initially sqrt(Dh), or model.qk_scale_init (meliad: 1)
            log_scale_H = param_with_axes(self, "log_scale", (H,), ("heads",), nn.initializers.constant(
                math.log(cfg.qk_scale_init) if cfg.qk_scale_init else 0.5 * math.log(Dh)))
            scale_HD = jnp.exp(log_scale_H)[:, None]
        else:
            scale_HD = jnp.full((H, 1), 1.0 / math.sqrt(Dh))
        # The scale is applied to the queries (N x H x Dh numbers) rather than to the scores (N x K).
        qu_BNHD = ((q_BNHD + u_HD.astype(dtype)) * scale_HD).astype(dtype)
        qv_BNHD = ((q_BNHD + v_HD.astype(dtype)) * scale_HD).astype(dtype)
        if cache is None:  # a whole segment, query block by query block
            out_BNHD = self.segment_attention(qu_BNHD, qv_BNHD, k_BKHD, v_BKHD, r_KHD, key_valid_BK, deterministic)
        else:  # a few rows at `position` (generation)
            out_BNHD = self.cached_attention(qu_BNHD, qv_BNHD, k_BKHD, v_BKHD, r_KHD, key_valid_BK, M + position,
                                             deterministic)
        if knn_memory is not None:
            gate_bias_H = param_with_axes(self, "gate_bias", (H,), ("heads",),
                                          nn.initializers.constant(cfg.knn.gate_bias_init))
            # meliad queries the store with the normalised q alone: no content bias u (the stored
            # keys carry no position); model.knn.query_content_bias adds u, as before the fixes.
            query_BHND = jnp.swapaxes(q_BNHD + u_HD.astype(dtype) if cfg.knn.query_content_bias else q_BNHD, 1, 2)
            out_BNHD = self.mix_in_memory(out_BNHD, query_BHND, jnp.exp(log_scale_H), gate_bias_H, knn_memory)
        return jnp.einsum("bnhd,hde->bne", out_BNHD, w_o), {"k": k_BKHD, "v": v_BKHD, "r": r_KHD, **raw_cache}

    def smear(self, k_rows, valid_BK, cache, start):
        """Smeared keys of the new rows, which start at row `start` of [memory ; segment] (valid
        rows `valid_BK`; see the class): (keys, {"k_raw": the unsmeared keys of [memory ;
        segment]}, which a cached call needs for its rows' predecessors)."""
        H = self.cfg.num_heads
        a_H = param_with_axes(self, "smear", (H,), ("heads",), nn.initializers.zeros_init())
        s_H = jax.nn.sigmoid(a_H).astype(k_rows.dtype)[:, None]
        n = k_rows.shape[1]
        raw_BKHD = k_rows if cache is None else \
            jax.lax.dynamic_update_slice_in_dim(cache["k_raw"], k_rows.astype(cache["k_raw"].dtype), start, 1)
        # Row j's predecessor is row j - 1 (none before row 0, nor when it is an empty memory row).
        prev_BKHD = jnp.pad(raw_BKHD, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
        prev_valid_BK = jnp.pad(valid_BK, ((0, 0), (1, 0)))[:, :-1]
        prev_BnHD = jax.lax.dynamic_slice_in_dim(prev_BKHD, start, n, 1)
        prev_valid_Bn = jax.lax.dynamic_slice_in_dim(prev_valid_BK, start, n, 1)
        prev_BnHD = jnp.where(prev_valid_Bn[:, :, None, None], prev_BnHD, 0).astype(k_rows.dtype)
        return s_H * k_rows + (1 - s_H) * prev_BnHD, {"k_raw": raw_BKHD}

    def dropout_rng(self, deterministic: bool):
        """A key for attention dropout, or None when there is none to apply."""
        return None if deterministic or self.cfg.attn_dropout == 0 else self.make_rng("dropout")

    def segment_attention(self, qu_BNHD, qv_BNHD, k_BKHD, v_BKHD, r_KHD, key_valid_BK, deterministic):
        """Attention of a whole segment's queries over [memory ; segment]: [B, N, H, Dh]. Queries
        go in blocks of `cfg.query_block` rows; block rows s..e-1 score only keys 0..M+e-1 (the
        later ones are in their future), so about half of the causal score matrix is never
        computed. The position term of a block is its relative shift over distances M+e-1..0."""
        cfg = self.cfg
        B, N, H, Dh = qu_BNHD.shape
        K = k_BKHD.shape[1]
        M = K - N
        Q = cfg.query_block or N
        rng = self.dropout_rng(deterministic)
        outs, probs = [], []
        for start in range(0, N, Q):
            stop = min(start + Q, N)
            Kb, Nb = M + stop, stop - start
            scores_BHNK = xl_scores(qu_BNHD[:, start:stop], qv_BNHD[:, start:stop], k_BKHD[:, :Kb], r_KHD)
            distance_NK = (M + start) + jnp.arange(Nb)[:, None] - jnp.arange(Kb)[None, :]
            mask_BHNK = (distance_NK >= 0)[None, None] & key_valid_BK[:, None, None, :Kb]
            p_BHNK, out_BNHD = softmax_attend(jnp.where(mask_BHNK, scores_BHNK, NEG_INF), v_BKHD[:, :Kb],
                                              cfg.attn_dropout, rng if rng is None else jax.random.fold_in(rng, start))
            outs.append(out_BNHD)
            probs.append(jnp.pad(p_BHNK, ((0, 0), (0, 0), (0, 0), (0, K - Kb))))
        # The whole probability matrix exists only when an intermediates collection asks for it.
        self.sow("intermediates", "attn_prob", jnp.concatenate(probs, axis=2))
        return jnp.concatenate(outs, axis=1)

    def cached_attention(self, qu_BNHD, qv_BNHD, k_BKHD, v_BKHD, r_KHD, key_valid_BK, first_row, deterministic):
        """Attention of a few new rows (generation: rows first_row.. of [memory ; segment]) over
        the cached keys and values of [memory ; segment], those after them masked: [B, n, H, Dh].
        Their position terms are scored against every distance and gathered by d = row - key."""
        N, K = qu_BNHD.shape[1], k_BKHD.shape[1]
        distance_NK = first_row + jnp.arange(N)[:, None] - jnp.arange(K)[None, :]
        ac_BHNK = jnp.einsum("bnhd,bkhd->bhnk", qu_BNHD, k_BKHD, preferred_element_type=jnp.float32)
        bd_BHNK = 0.0 if r_KHD is None else gather_by_distance(
            jnp.einsum("bnhd,khd->bhnk", qv_BNHD, r_KHD, preferred_element_type=jnp.float32), distance_NK)
        mask_BHNK = (distance_NK >= 0)[None, None] & key_valid_BK[:, None, None, :]
        probs_BHNK, out_BNHD = softmax_attend(jnp.where(mask_BHNK, ac_BHNK + bd_BHNK, NEG_INF), v_BKHD,
                                              self.cfg.attn_dropout, self.dropout_rng(deterministic))
        self.sow("intermediates", "attn_prob", probs_BHNK)
        return out_BNHD

    def mix_in_memory(self, local_BNHD, query_BHND, scale_H, gate_bias_H, knn_memory):
        """out = g * a_mem + (1 - g) * a_local per head, g = sigmoid(gate_bias); a query with no valid
        entry (an empty or size-0 store) reads a_mem = 0, so out = (1 - g) * a_local (spec §3, meliad)."""
        c = self.cfg.knn
        g_H = jax.nn.sigmoid(gate_bias_H).astype(local_BNHD.dtype)
        local_BNHD = (1 - g_H[:, None]) * local_BNHD
        if knn_memory["keys"].shape[2] == 0:
            return local_BNHD
        memory = jax.tree.map(jax.lax.stop_gradient, knn_memory)  # stored entries are constants
        # The search itself is not differentiated (its backward would be another N x S matmul):
        # the k winners' scores are recomputed from their gathered keys, so the gradient reaching
        # the queries costs O(N k D).
        _, slots_BHNK, valid_BHNK = knn.search(memory, jax.lax.stop_gradient(query_BHND), c.k, c.backend,
                                               c.recall_target, c.chunk_size, c.bucket_size)
        keys_BHNKD = knn.stored_keys(knn.gather(memory["keys"], slots_BHNK), query_BHND.dtype)
        scores_BHNK = jnp.einsum("bhnd,bhnkd->bhnk", query_BHND, keys_BHNKD, preferred_element_type=jnp.float32)
        logits = jnp.where(valid_BHNK, scores_BHNK * scale_H[None, :, None, None], NEG_INF)
        probs_BHNK = jnp.where(valid_BHNK, jax.nn.softmax(logits, axis=-1), 0.0)  # all invalid: zeros, not 1/k
        values_BHNKD = knn.gather(memory["values"], slots_BHNK).astype(local_BNHD.dtype)
        a_mem_BNHD = jnp.einsum("bhnk,bhnkd->bnhd", probs_BHNK.astype(local_BNHD.dtype), values_BHNKD)
        self.sow("intermediates", "knn_top1", (scores_BHNK[..., 0], valid_BHNK[..., 0]))
        self.sow("intermediates", "knn_probs", probs_BHNK)
        return g_H[:, None] * a_mem_BNHD + local_BNHD
