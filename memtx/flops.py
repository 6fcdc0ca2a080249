"""Model FLOPs of a train step and model FLOPs utilisation (MFU).

Model FLOPs count the matmuls the model needs (not what rematerialisation recomputes, not the
elementwise work): per token and layer 2 x the projection and FFN weights, and for attention
over K keys (memtx/memory/*.attended_rows) 2 x H x Dh x K for each of the content scores, the
position scores and the weighted values (the causal mask not subtracted, as PaLM's MFU), plus the
output layer. Training costs three times the forward pass (the backward pass twice). A kNN
layer's search (2 x H x Dh x slots per token) and its retrieval attention run forward only.
Kind-specific extras (LaMemo's look-ahead, the compression network, the block-recurrent state)
are not counted: for those kinds the MFU is a lower bound.
"""

from __future__ import annotations

from memtx.config import Config
from memtx.memory import registry

# Dense bfloat16 peak FLOP/s of one JAX device, by device_kind prefix (TPU v2/v3: a JAX device is
# one TensorCore, half a chip; later TPUs and GPUs: one chip). Vendors' datasheet figures.
PEAK_FLOPS = (
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100", 312e12),
)


def train_flops_per_token(cfg: Config) -> float:
    m, N = cfg.model, cfg.data.seq_len
    H, Dh, D, F, L = m.num_heads, m.dim_per_head, m.d_model, m.d_ff, m.num_layers
    K = registry.of(m).state.attended_rows(m, N)
    weights = 3 * D * H * Dh + H * Dh * D + 2 * D * F  # q, k, v, output projection; FFN
    position = K * D * H * Dh / N  # the position vectors' projection, shared by a segment's tokens
    attention = 3 * H * Dh * K
    forward = L * 2 * (weights + position + attention) + 2 * D * m.vocab_size
    knn_layers = len(m.knn.layer_indices(L))
    knn_forward = knn_layers * 2 * H * Dh * (m.knn.size + 2 * m.knn.k)  # search, then attention over k entries
    return 3 * forward + knn_forward


def peak_flops_per_device(cfg: Config, device_kind: str) -> float:
    """train.peak_flops_per_device, or the table's figure for `device_kind`, or 0 (unknown)."""
    if cfg.train.peak_flops_per_device:
        return cfg.train.peak_flops_per_device
    return next((peak for prefix, peak in PEAK_FLOPS if device_kind.startswith(prefix)), 0.0)


def mfu(cfg: Config, tokens_per_s: float, num_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation of a run at `tokens_per_s`, or None when the peak is unknown."""
    peak = peak_flops_per_device(cfg, device_kind)
    return tokens_per_s * train_flops_per_token(cfg) / (peak * num_devices) if peak else None
