"""Named reads of what a layer's attention sows (`("intermediates", ...)` with `segment_nll(...,
with_intermediates=True)`) and of its parameters, so that no caller spells Flax's module paths.

What the attention modules sow, per layer (each a tuple of the values sown in one call):
  attn_prob   [B, H, N, M+N] attention probabilities over [memory ; segment] (XL, kNN, Compressive)
  knn_top1    (scores [B, H, N], valid [B, H, N]) of each query's best kNN entry (kNN layers)
  knn_probs   [B, H, N, k] the kNN attention's probabilities (kNN layers)
  alpha       [B, M, H] LaMemo's interpolation weight of each memory slot (LaMemo layers)
"""

from __future__ import annotations

from memtx.layers import layer_tree  # a scanned run (model.scan_layers) holds its layers stacked


def attention(inter: dict, layer: int, name: str):
    """What layer `layer`'s attention sowed under `name` (its first call's value)."""
    return layer_tree(inter, layer)["attn"][name][0]


def attention_param(params: dict, layer: int, name: str):
    """Parameter `name` of layer `layer`'s attention (e.g. "gate_bias", "qkv")."""
    return layer_tree(params, layer)["attn"][name]
