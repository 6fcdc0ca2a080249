"""The output cache: a test-time memory of the model's own output states (no training).

Two classic scorers over one store of (h_i, y_i) pairs, h_i the output layer's input at position
i and y_i its next token, kept per row and reset at each document:

  continuous  the continuous cache (Grave, Joulin & Usunier 2017): p_cache(w) proportional to
              the sum over entries with y_i = w of exp(theta * h_t . h_i), over the whole cache
              (`k` 0) or its top k;
  knn_lm      kNN-LM (Khandelwal et al. 2020): the k nearest entries, softmax over -d(h_t, h_i)/T.

and the model's distribution is mixed with it: p = (1 - w) p_model + w p_cache, where the weight
w is lambda, fixed once the cache holds anything, or grows with how full it is,
lambda * n / (n + fill) with n the entries position t can read (`fill` > 0), so that the first
positions of a document, where the cache is nearly empty, lean on the model; or w is predicted
per position by a gate (`gate`: a logistic regression fitted after the fact on tuning documents,
the model frozen, in the manner of pointer-sentinel models' learned switch) from the unit-length
h_t, log(1 + n) and the cache's best score at t (how closely some entry matches).

With `normalize` (the default) h is scaled to unit length: scores are cosines, and kNN-LM's
squared distance 2 - 2 cos makes exp(-d/T) proportional to exp((2/T) cos), so both scorers read
`theta` as the same inverse temperature (kNN-LM's theta is 2/T). Without it, kNN-LM keys are
[h, -|h|^2 / 2] and queries [h, 1]: the inner product is (|h_t|^2 - |h_t - h_i|^2) / 2, so the
top k by inner product are the nearest by L2 and theta = 2/T again.

Strictly causal: position t reads the store (earlier segments of its document, written after they
were scored) and the positions of its own segment before t. The store is the kNN memory's
(memtx/memory/knn.py) with one head: its ring buffer, reset, write and search backends; the
values are the next tokens (int32, [B, 1, S, 1]); `seen` counts the document's tokens before the
segment (where each position lies in its document).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from memtx.memory import knn

SCORERS = ("continuous", "knn_lm")
# Not the kNN store's axes: one "head", so only rows (and slots, where the rules shard them) split.
LOGICAL_AXES = {"keys": ("act_batch", None, "act_mem", None), "values": ("act_batch", None, "act_mem", None),
                "pointer": ("act_batch",), "count": ("act_batch",), "seen": ("act_batch",)}


@dataclass(frozen=True)
class CacheSpec:
    """What the cache keeps and how it scores (see the module docstring)."""

    size: int  # entries per row (the store's slots)
    scorer: str = "continuous"
    k: int = 0  # entries scored per query: 0 = all of them (continuous only)
    normalize: bool = True  # unit-length h
    theta: float = 1.0  # inverse temperature
    lam: float = 0.0  # lambda: the cache's weight in the mixture (its maximum with `fill`)
    fill: float = 0.0  # lambda * n / (n + fill); 0: lambda as soon as the cache holds an entry
    backend: str = "auto"  # the kNN store's search backend (with k > 0)
    gate: tuple = ()  # the learned gate's weights (gate_features' D + 2, then a bias); () = lambda and fill

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"cache size must be >= 1, got {self.size}")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown cache scorer '{self.scorer}' (one of {', '.join(SCORERS)})")
        if self.k < 0 or (self.scorer == "knn_lm" and self.k < 1):
            raise ValueError(f"cache k must be >= 0 (>= 1 for knn_lm), got {self.k}")
        if self.backend not in knn.BACKENDS:
            raise ValueError(f"unknown cache search backend '{self.backend}' (one of {', '.join(knn.BACKENDS)})")
        for name, low, high in (("theta", 0.0, math.inf), ("lam", 0.0, 1.0), ("fill", 0.0, math.inf)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value < high):
                raise ValueError(f"cache {name} must be finite and in [{low}, {high}), got {value}")
        if not all(isinstance(g, (int, float)) and math.isfinite(g) for g in self.gate):
            raise ValueError("cache gate weights must be finite numbers")

    def key_dim(self, d_model: int) -> int:
        return d_model + (self.scorer == "knn_lm" and not self.normalize)


def init(batch_size: int, size: int, key_dim: int) -> dict:
    return {"keys": jnp.zeros((batch_size, 1, size, key_dim), jnp.float32),
            "values": jnp.zeros((batch_size, 1, size, 1), jnp.int32),
            "pointer": jnp.zeros((batch_size,), jnp.int32), "count": jnp.zeros((batch_size,), jnp.int32),
            "seen": jnp.zeros((batch_size,), jnp.int32)}  # tokens of the document before this segment


def reset_rows(cache: dict, reset_B: jax.Array) -> dict:
    """The rows starting a document forget their entries (the kNN store's reset)."""
    return {**knn.reset_rows(cache, reset_B), "seen": jnp.where(reset_B, 0, cache["seen"])}


def keys_and_queries(h_BND: jax.Array, spec: CacheSpec) -> tuple[jax.Array, jax.Array]:
    """What the cache stores for each position and what each position asks it with ([B, N, D'])."""
    h_BND = h_BND.astype(jnp.float32)
    if spec.normalize:
        h_BND = h_BND / jnp.maximum(jnp.linalg.norm(h_BND, axis=-1, keepdims=True), 1e-6)
        return h_BND, h_BND
    if spec.scorer == "knn_lm":  # inner product = (|h_t|^2 - |h_t - h_i|^2) / 2
        ones = jnp.ones_like(h_BND[..., :1])
        return (jnp.concatenate([h_BND, -0.5 * jnp.sum(h_BND * h_BND, -1, keepdims=True)], -1),
                jnp.concatenate([h_BND, ones], -1))
    return h_BND, h_BND


def write(cache: dict, keys_BND: jax.Array, targets_BN: jax.Array, num_valid_B: jax.Array) -> dict:
    """Appends each row's first `num_valid[b]` (h, next token) pairs (the kNN store's FIFO)."""
    written = knn.write(cache, keys_BND[:, :, None, :], targets_BN.astype(jnp.int32)[:, :, None, None], num_valid_B)
    return {**written, "seen": cache["seen"] + num_valid_B}


def candidates(cache: dict, queries_BND, keys_BND, targets_BN, num_valid_B, spec: CacheSpec):
    """The entries each position may read, scored: (scores, tokens, valid) [B, N, C] and how many
    entries it can read, n_BN. C: the store's S slots (or its top k) and the segment's N positions
    (the earlier valid ones only); with k > 0, the top k of those together."""
    B, N, _ = queries_BND.shape
    store_tokens_BS = cache["values"][:, 0, :, 0]
    if spec.k == 0:
        scores_BNS = knn._masked_scores(queries_BND[:, None], cache["keys"], cache["count"])[:, 0]
        tokens_BNS = jnp.broadcast_to(store_tokens_BS[:, None, :], scores_BNS.shape)
        valid_BNS = scores_BNS > knn.NEG_INF / 2
    else:
        k = min(spec.k, cache["keys"].shape[2])
        scores, slots, valid = knn.search(cache, queries_BND[:, None], k, spec.backend)
        scores_BNS, valid_BNS = scores[:, 0], valid[:, 0]
        tokens_BNS = jnp.take_along_axis(store_tokens_BS[:, None, :], slots[:, 0], axis=2)
    position_N = jnp.arange(N)
    local_BNN = jnp.einsum("bnd,bmd->bnm", queries_BND, keys_BND, preferred_element_type=jnp.float32)
    local_valid_BNN = ((position_N[:, None] > position_N[None, :])[None]
                       & (position_N[None, None, :] < num_valid_B[:, None, None]))
    scores = jnp.concatenate([scores_BNS, local_BNN], -1)
    tokens = jnp.concatenate([tokens_BNS, jnp.broadcast_to(targets_BN[:, None, :], (B, N, N))], -1)
    valid = jnp.concatenate([valid_BNS, local_valid_BNN], -1)
    if spec.k:
        top, which = lax.top_k(jnp.where(valid, scores, knn.NEG_INF), min(spec.k, scores.shape[-1]))
        scores, tokens = top, jnp.take_along_axis(tokens, which, -1)
        valid = top > knn.NEG_INF / 2
    n_BN = cache["count"][:, None] + jnp.minimum(position_N[None, :], num_valid_B[:, None])
    return scores, tokens, valid, n_BN


def log_prob(scores_BNC, tokens_BNC, valid_BNC, targets_BN, theta) -> jax.Array:
    """log p_cache(target) [B, N]; -inf where the cache holds no entry of the target (or none)."""
    logits = jnp.where(valid_BNC, theta * scores_BNC, -jnp.inf)
    total = jax.nn.logsumexp(logits, -1)
    hit = jax.nn.logsumexp(jnp.where(tokens_BNC == targets_BN[..., None], logits, -jnp.inf), -1)
    return jnp.where(jnp.isfinite(total) & jnp.isfinite(hit), hit - total, -jnp.inf)


def weight(n_BN, lam, fill) -> jax.Array:
    """The cache's weight at each position: 0 while it is empty, then lam * n / (n + fill) (lam
    with fill 0)."""
    n = n_BN.astype(jnp.float32)
    share = jnp.where(fill > 0, n / jnp.maximum(n + fill, 1e-9), 1.0)
    return jnp.where(n > 0, lam * share, 0.0)


GATE_MAX = 0.99  # the gate's weight is GATE_MAX * sigmoid(.): the model always keeps some mass


def gate_features(h_BND, scores_BNC, valid_BNC, n_BN) -> jax.Array:
    """[B, N, D + 2]: h_t at unit length, log(1 + n) / 8 and the cache's best score at t (0 with none)."""
    h_BND = h_BND.astype(jnp.float32)
    unit = h_BND / jnp.maximum(jnp.linalg.norm(h_BND, axis=-1, keepdims=True), 1e-6)
    best = jnp.max(jnp.where(valid_BNC, scores_BNC, -jnp.inf), -1)
    best = jnp.where(jnp.isfinite(best), best, 0.0)
    return jnp.concatenate([unit, jnp.log1p(n_BN.astype(jnp.float32))[..., None] / 8.0, best[..., None]], -1)


def gate_weight(features_BNF, gate, n_BN) -> jax.Array:
    """The learned gate's weight: GATE_MAX * sigmoid(features . g + bias), 0 while the cache is empty."""
    gate = jnp.asarray(gate, jnp.float32)
    w = GATE_MAX * jax.nn.sigmoid(features_BNF @ gate[:-1] + gate[-1])
    return jnp.where(n_BN > 0, w, 0.0)


def mixture_weight(spec: CacheSpec, n_BN, h_BND=None, scores_BNC=None, valid_BNC=None) -> jax.Array:
    """w [B, N]: the learned gate's if the spec has one (it reads h and the candidates), else lambda
    and fill's."""
    if spec.gate:
        return gate_weight(gate_features(h_BND, scores_BNC, valid_BNC, n_BN), spec.gate, n_BN)
    return weight(n_BN, spec.lam, spec.fill)


def mix_nll(nll_model_BN, logp_cache_BN, w_BN) -> jax.Array:
    """-log((1 - w) p_model + w p_cache); exactly the model's NLL where w = 0."""
    return -jnp.logaddexp(jnp.log1p(-w_BN) - nll_model_BN, jnp.log(w_BN) + logp_cache_BN)


def mixed_nll(nll_model_BN, logp_cache_BN, n_BN, lam, fill) -> jax.Array:
    """mix_nll with w = weight(n, lam, fill)."""
    return mix_nll(nll_model_BN, logp_cache_BN, weight(n_BN, lam, fill))


def log_distribution(logp_model_BNV, scores_BNC, tokens_BNC, valid_BNC, theta, w_BN) -> jax.Array:
    """log of the whole mixed distribution [B, N, V] (generation samples from it): the model's
    log-probabilities and the cache's over the vocabulary, each entry's share added to its token,
    with weight w (mixture_weight). At a position's target it is -mix_nll."""
    V = logp_model_BNV.shape[-1]
    logits = jnp.where(valid_BNC, theta * scores_BNC, -jnp.inf)
    total = jax.nn.logsumexp(logits, -1, keepdims=True)
    share = jnp.where(valid_BNC, jnp.exp(logits - jnp.where(jnp.isfinite(total), total, 0.0)), 0.0)
    B, N, _ = share.shape
    p_cache = jnp.zeros((B, N, V), jnp.float32).at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None],
                                                     tokens_BNC].add(share)
    w = w_BN[..., None]
    return jnp.logaddexp(jnp.log1p(-w) + logp_model_BNV, jnp.log(w) + jnp.log(p_cache))


def grid_nll(nll_model_BN, scores, tokens, valid, n_BN, targets_BN, weights_BN, thetas, lams, fills) -> jax.Array:
    """[len(thetas), len(lams), len(fills)] sums of the mixed NLL over the scored positions: one
    pass over a tuning set scores every setting."""
    def for_theta(theta):
        logp_BN = log_prob(scores, tokens, valid, targets_BN, theta)
        def for_lam_fill(lam, fill):
            nll = mixed_nll(nll_model_BN, logp_BN, n_BN, lam, fill)
            return jnp.sum(jnp.where(weights_BN > 0, nll, 0.0))
        lam_G, fill_G = jnp.meshgrid(jnp.asarray(lams, jnp.float32), jnp.asarray(fills, jnp.float32), indexing="ij")
        return jax.vmap(jax.vmap(for_lam_fill))(lam_G, fill_G)
    return jax.lax.map(for_theta, jnp.asarray(thetas, jnp.float32))

