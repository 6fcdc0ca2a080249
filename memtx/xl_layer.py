"""The Transformer-XL layer (spec §1) and the XL memory's layer stack; the kNN memory (spec §3) is
read in the layers `model.knn` names and written here, next to the XL cache."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from memtx.attention import RelativeAttention
from memtx.config import ModelConfig
from memtx.layers import layer_class, layer_parts
from memtx.memory import knn, xl


class XLLayer(nn.Module):
    """Relative attention over [memory ; segment] and a ReLU FFN; post-LN or pre-LN."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic: bool = True,
                 knn_memory=None, cache=None, position=None):
        """Returns (output, attention cache); `knn_memory` (a kNN layer's store) is read, not
        written. See RelativeAttention for `cache` / `position` (generation inside a segment)."""
        cfg = self.cfg
        attn = RelativeAttention(cfg, name="attn")
        ffn, attn_norm, ffn_norm, drop = layer_parts(cfg)
        if cfg.pre_norm:
            mem_in_BMD = attn_norm(mem_BMD) if cache is None else mem_BMD  # cached: keys already computed
            a, cache = attn(attn_norm(h_BND), mem_in_BMD, mem_valid_BM, u_HD, v_HD, deterministic, knn_memory,
                            cache, position)
            h_BND = h_BND + drop(a, deterministic=deterministic)
            f = ffn(ffn_norm(h_BND), deterministic)
            h_BND = h_BND + drop(f, deterministic=deterministic)
        else:
            a, cache = attn(h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic, knn_memory, cache, position)
            h_BND = attn_norm(h_BND + drop(a, deterministic=deterministic))
            f = ffn(h_BND, deterministic)
            h_BND = ffn_norm(h_BND + drop(f, deterministic=deterministic))
        self.sow("intermediates", "out", h_BND)
        return nn.with_logical_constraint(h_BND, ("act_batch", "act_seq", "act_embed")), cache


def run_layers(model, h_BND, mem_LBMD, mem_valid_BM, knn_stores, num_valid_B, u_HD, v_HD, deterministic,
               cache=None, position=None):
    """Every XLLayer over its memory rows `mem_LBMD[layer]`; writes each kNN layer's store with
    its segment keys and values (not with a cache: generation writes whole segments).
    Returns (output, each layer's input [L, B, N, D], kNN stores, attention caches)."""
    cfg = model.cfg
    knn_stores, layer_inputs, new_cache = dict(knn_stores), [], []
    for layer in range(cfg.num_layers):
        layer_inputs.append(h_BND)
        store = knn_stores.get(str(layer))
        h_BND, layer_cache = layer_class(XLLayer, cfg)(cfg, name=f"layer_{layer}")(
            h_BND, mem_LBMD[layer], mem_valid_BM, u_HD, v_HD, deterministic, store,
            None if cache is None else cache[layer], position)
        new_cache.append(layer_cache)
        # size 0: nothing is ever stored (every read is empty)
        if store is not None and store["keys"].shape[2] > 0 and cache is None:
            M = mem_LBMD.shape[2]
            knn_stores[str(layer)] = knn.write(store, layer_cache["k"][:, M:], layer_cache["v"][:, M:], num_valid_B)
    return h_BND, jnp.stack(layer_inputs), knn_stores, new_cache


def stack(model, h_BND, emb_BND, state, knn_stores, num_valid_B, u_HD, v_HD, deterministic, cache=None,
          position=None):
    """The XL stack: layer l attends over the last M inputs of layer l, then they are appended."""
    h_BND, inputs_LBND, knn_stores, new_cache = run_layers(
        model, h_BND, state["hidden"], xl.valid_mask(state), knn_stores, num_valid_B, u_HD, v_HD, deterministic,
        cache, position)
    if cache is None:
        state = xl.write(state, inputs_LBND, num_valid_B)
    return h_BND, state, knn_stores, new_cache
