"""The Transformer-XL layer (spec §1) and the XL memory's layer stack; the kNN memory (spec §3) is
read in the layers `model.knn` names and written here, next to the XL cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from memtx.attention import RelativeAttention
from memtx.layers import layer_class, layer_parts, layer_runs, run_name, scan_run, stack_trees, unstack_tree
from memtx.memory import knn
from memtx.memory.kind import Segment, StackOutput
from memtx.memory.xl import state as xl

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


class XLLayer(nn.Module):
    """Relative attention over [memory ; segment] and a ReLU FFN; post-LN or pre-LN."""

    cfg: ModelConfig
    smear_keys: bool = False  # RelativeAttention.smear_keys (model.smeared_keys names the layers)

    @nn.compact
    def __call__(self, h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic: bool = True,
                 knn_memory=None, cache=None, position=None):
        """Returns (output, attention cache); `knn_memory` (a kNN layer's store) is read, not
        written. See RelativeAttention for `cache` / `position` (generation inside a segment)."""
        cfg = self.cfg
        attn = RelativeAttention(cfg, self.smear_keys, name="attn")
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


def scan_runs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The stack's layer ranges (layers.layer_runs): with `model.scan_layers` the kNN layers and
    the layers with smeared keys, whose attention differs, run alone and the rest as scans."""
    knn_layers = cfg.knn.layer_indices(cfg.num_layers) if cfg.knn.enabled else ()
    return layer_runs(cfg, (*knn_layers, *cfg.smeared_keys))


def run_layers(model, segment: Segment, mem_LBMD, mem_valid_BM):
    """Every XLLayer over its memory rows `mem_LBMD[layer]`; writes each kNN layer's store with
    its segment keys and values (not with a cache: generation writes whole segments).
    Returns (output, each layer's input [L, B, N, D], kNN stores, attention caches)."""
    cfg = model.cfg
    h_BND, cache, position, deterministic = segment.h_BND, segment.cache, segment.position, segment.deterministic
    u_HD, v_HD = segment.u_HD, segment.v_HD
    knn_stores, layer_inputs, new_cache = dict(segment.knn_stores or {}), [], []
    for a, b in scan_runs(cfg):
        if b - a > 1:  # identical layers as one scan; each also returns its input and its cache
            def body(layer, h_BND, xs, shared):
                (mem_BMD, layer_cache), (mem_valid_BM, u_HD, v_HD, position) = xs, shared
                out_BND, layer_cache = layer(h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic, None,
                                             layer_cache, position)
                return out_BND, (h_BND, layer_cache)

            h_BND, (inputs_nBND, caches) = scan_run(
                XLLayer, cfg, a, b, body, h_BND, (mem_LBMD[a:b], None if cache is None else stack_trees(cache[a:b])),
                (mem_valid_BM, u_HD, v_HD, position))
            layer_inputs.append(inputs_nBND)
            new_cache += unstack_tree(caches, b - a)
            continue
        layer_inputs.append(h_BND[None])
        store = knn_stores.get(str(a))
        h_BND, layer_cache = layer_class(XLLayer, cfg)(cfg, a in cfg.smeared_keys, name=run_name(a, b))(
            h_BND, mem_LBMD[a], mem_valid_BM, u_HD, v_HD, deterministic, store,
            None if cache is None else cache[a], position)
        new_cache.append(layer_cache)
        # size 0: nothing is ever stored (every read is empty)
        if store is not None and store["keys"].shape[2] > 0 and cache is None:
            M = mem_LBMD.shape[2]
            knn_stores[str(a)] = knn.write(store, layer_cache["k"][:, M:], layer_cache["v"][:, M:], segment.num_valid_B)
    return h_BND, jnp.concatenate(layer_inputs), knn_stores, new_cache


def stack(model, segment: Segment, state: dict) -> StackOutput:
    """The XL stack: layer l attends over the last M inputs of layer l, then they are appended."""
    h_BND, inputs_LBND, knn_stores, new_cache = run_layers(model, segment, state["hidden"], xl.valid_mask(state))
    if segment.cache is None:
        state = xl.write(state, inputs_LBND, segment.num_valid_B)
    return StackOutput(h_BND, state, knn_stores, new_cache)
