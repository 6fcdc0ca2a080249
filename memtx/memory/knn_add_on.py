"""The Memorizing Transformer's kNN memory as an add-on (the contract: memtx/memory/add_ons.py).

Its store is memtx/memory/knn.py (ring buffer, search backends), its read the kNN layer's
attention (memtx/attention.py), its write the XL stack's (memtx/memory/xl/layers.py). This module
is what the rest of memtx asks of it: the layers that have it, each layer's state, the train
loop's gate and fill metrics, the eval step's retrieval sums, evaluation's fields and memtx.fit's
bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memtx import probes
from memtx.memory import knn

NAME = "knn"
LOGICAL_AXES = knn.LOGICAL_AXES


def layers(cfg) -> tuple[int, ...]:
    return cfg.knn.layer_indices(cfg.num_layers)


def init_layer(cfg, batch_size: int) -> dict:
    return knn.init(batch_size, cfg.num_heads, cfg.knn.size, cfg.dim_per_head, jnp.dtype(cfg.knn.dtype))


def reset_rows(state: dict, reset_B: jax.Array) -> dict:
    return knn.reset_rows(state, reset_B)


def describe(cfg) -> str:
    return f", kNN memory {cfg.knn.size}" if cfg.knn.enabled else ""


def _stores(cfg) -> bool:
    """Whether it holds entries at all (size 0: every read is empty)."""
    return cfg.knn.enabled and cfg.knn.size > 0


def train_metrics(cfg, params, states: dict) -> dict:
    """Each kNN layer's gate per head (sigmoid of its bias) and store fill (mean over rows)."""
    out = {}
    if not _stores(cfg):
        return out
    for layer in layers(cfg):
        # Reduced under jit: the results are replicated, so every process can read them even when
        # the store's rows live on other processes' devices.
        gates, fill = _gate_and_fill(probes.attention_param(params, int(layer), "gate_bias"), states[str(layer)]["count"])
        out.update({f"knn_gate_l{layer}_h{h}": float(g) for h, g in enumerate(jax.device_get(gates))})
        out[f"knn_fill_l{layer}"] = float(fill) / cfg.knn.size
    return out


@jax.jit
def _gate_and_fill(gate_bias_H, count_B):
    return jax.nn.sigmoid(gate_bias_H), jnp.mean(count_B.astype(jnp.float32))


def eval_sums(cfg, intermediates, states: dict, scored_BN) -> dict:
    """A segment's retrieval sums: `top1_sum`/`top1_count` over scored tokens whose top entry is
    valid (its inner product with the query), `fill_sum` of each row's store fill fraction after
    the segment, weighted by the row's scored tokens."""
    sums = {"top1_sum": jnp.float32(0), "top1_count": jnp.float32(0), "fill_sum": jnp.float32(0)}
    if cfg.knn.size == 0:  # nothing is ever stored
        return sums
    for layer, store in states.items():
        scores_BHN, valid_BHN = probes.attention(intermediates, int(layer), "knn_top1")
        counted = valid_BHN & scored_BN[:, None, :]
        sums["top1_sum"] += jnp.sum(jnp.where(counted, scores_BHN, 0.0))
        sums["top1_count"] += jnp.sum(counted)
        sums["fill_sum"] += jnp.sum(store["count"] / cfg.knn.size * jnp.sum(scored_BN, -1)) / len(states)
    return sums


def eval_result(cfg, params, sums: dict, tokens: float) -> dict:
    if not _stores(cfg):
        return {}
    return {"knn_fill": float(sums["fill_sum"]) / max(tokens, 1),
            "knn_top1_score": float(sums["top1_sum"]) / max(float(sums["top1_count"]), 1),
            "knn_gate": {str(layer): jax.nn.sigmoid(probes.attention_param(params, int(layer), "gate_bias")).tolist()
                         for layer in layers(cfg)}}


def activation_bytes(cfg, batch: int, seq_len: int) -> int:
    """Retrieved keys/values and their scores, and the search's scores over every slot (float32)."""
    if not cfg.knn.enabled:
        return 0
    backend = knn.resolve_backend(cfg.knn.backend, cfg.knn.size, "tpu")  # auto: as on TPU, the larger (whole matrix)
    search = min(cfg.knn.chunk_size, cfg.knn.size) if backend in knn.TILED_BACKENDS else cfg.knn.size
    return len(layers(cfg)) * batch * cfg.num_heads * seq_len * (cfg.knn.k * (2 * cfg.dim_per_head + 2) + 2 * search) * 4
