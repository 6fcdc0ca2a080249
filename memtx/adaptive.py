"""Adaptive input embedding (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017), as in
the Transformer-XL / LaMemo reference code (`AdaptiveEmbedding`, `ProjectedAdaptiveLogSoftmax`).

The vocabulary is split by `cutoffs` (c_1 < c_2 < ...) into clusters [0, c_1), [c_1, c_2), ...,
[c_last, V). Cluster i has an embedding table of width d_i = d_model // div_val**i and, when
div_val > 1, a projection d_i -> d_model. Input embeddings are scaled by sqrt(d_model).

The softmax is a head over [cluster 0's tokens ; one logit per tail cluster] followed, for a
token of tail cluster i, by a softmax within that cluster. Output weights are tied to the
embedding tables; the projections are tied for clusters >= 1 while cluster 0 (the head) has its
own (`head_proj`), as in the LaMemo WikiText-103 setup. Reference convention kept: tail cluster i
reads head column -i, i.e. the cluster logits are in reversed order (`cluster_weight` row
n_clusters - i belongs to tail cluster i).

Parameter layout (`x @ W` convention; torch (out, in) weights are transposed):
  emb_{i} [V_i, d_i]          cluster i's table, also its output weight (tied)
  emb_proj_{i} [d_i, D]       input projection (div_val > 1 only); transposed for the output
                              of clusters >= 1 (tied)
  head_proj [d_0, D]          cluster 0's output projection (div_val > 1 only; untied)
  out_bias_{i} [V_i]          output biases
  cluster_weight [n, d_0], cluster_bias [n]   head logits of the n tail clusters (reversed)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import param_with_axes

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


def cluster_bounds(vocab_size: int, cutoffs) -> list[tuple[int, int]]:
    ends = [0, *cutoffs, vocab_size]
    return list(zip(ends[:-1], ends[1:]))


class AdaptiveIO(nn.Module):
    """Adaptive input embedding (`embed`) and adaptive softmax (`log_probs`, `nll`), tied."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        D = cfg.d_model
        init = nn.initializers.normal(cfg.init_std)
        self.bounds = cluster_bounds(cfg.vocab_size, cfg.adaptive_cutoffs)
        self.dims = [D // cfg.adaptive_div_val ** i for i in range(len(self.bounds))]
        self.projected = cfg.adaptive_div_val > 1  # div_val 1: every d_i = D, no projections
        self.tables = [param_with_axes(self, f"emb_{i}", (r - l, d), ("vocab", "embed"), init)
                       for i, ((l, r), d) in enumerate(zip(self.bounds, self.dims))]
        self.biases = [param_with_axes(self, f"out_bias_{i}", (r - l,), ("vocab",), nn.initializers.zeros)
                       for i, (l, r) in enumerate(self.bounds)]
        if self.projected:
            self.projs = [param_with_axes(self, f"emb_proj_{i}", (d, D), (None, "embed"), init)
                          for i, d in enumerate(self.dims)]
            self.head_proj = param_with_axes(self, "head_proj", (self.dims[0], D), (None, "embed"), init)
        n_tail = len(self.bounds) - 1
        self.cluster_weight = param_with_axes(self, "cluster_weight", (n_tail, self.dims[0]), (None, None), init)
        self.cluster_bias = param_with_axes(self, "cluster_bias", (n_tail,), (None,), nn.initializers.zeros)

    def embed(self, inputs_BN):
        """Token ids [B, N] -> scaled embeddings [B, N, D] (in cfg.dtype)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        emb_BND = jnp.zeros((*inputs_BN.shape, cfg.d_model), dtype)
        for i, (l, r) in enumerate(self.bounds):
            in_cluster_BN = (inputs_BN >= l) & (inputs_BN < r)
            # One-hot matmul rather than a gather: it partitions cleanly with the vocabulary sharded.
            one_hot_BNC = jax.nn.one_hot(jnp.where(in_cluster_BN, inputs_BN - l, -1), r - l, dtype=dtype)
            e_BNd = one_hot_BNC @ self.tables[i].astype(dtype)
            if self.projected:
                e_BNd = e_BNd @ self.projs[i].astype(dtype)
            emb_BND = emb_BND + e_BNd  # rows outside the cluster are zero (one-hot of -1)
        return emb_BND * jnp.sqrt(cfg.d_model).astype(dtype)

    def log_probs(self, h_BND):
        """Final hidden states [B, N, D] -> log-probabilities over the vocabulary [B, N, V], float32."""
        h_BND = h_BND.astype(jnp.float32)
        n_tail = len(self.bounds) - 1
        head_in_BNd = h_BND @ self.head_proj.T if self.projected else h_BND
        head_logits_BNH = jnp.concatenate(
            [head_in_BNd @ self.tables[0].T + self.biases[0],
             head_in_BNd @ self.cluster_weight.T + self.cluster_bias], axis=-1)
        head_logp_BNH = jax.nn.log_softmax(head_logits_BNH, axis=-1)
        V0 = self.bounds[0][1]
        pieces = [head_logp_BNH[..., :V0]]
        for i in range(1, n_tail + 1):
            tail_in_BNd = h_BND @ self.projs[i].T if self.projected else h_BND
            tail_logp_BNC = jax.nn.log_softmax(tail_in_BNd @ self.tables[i].T + self.biases[i], axis=-1)
            pieces.append(head_logp_BNH[..., V0 + n_tail - i, None] + tail_logp_BNC)  # column -i
        return jnp.concatenate(pieces, axis=-1)

    def nll(self, h_BND, targets_BN):
        """Per-token negative log-likelihood [B, N], float32."""
        logp_BNV = self.log_probs(h_BND)
        return -jnp.take_along_axis(logp_BNV, targets_BN[..., None], axis=-1)[..., 0]

    def __call__(self, inputs_BN):
        return self.embed(inputs_BN)
