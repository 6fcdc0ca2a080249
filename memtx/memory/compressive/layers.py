"""The Compressive Transformer's layer stack (Rae et al. 2020): Transformer-XL layers attending
over [compressed memory ; memory ; segment], the compression network that turns the slots the
FIFO memory evicts into compressed slots, and its attention-reconstruction loss.

Per layer l and segment, with h the layer's input rows and old the slots its memory evicts:

    new_cm = f_c(old)     c neighbouring slots -> one (mean-pool, or a 1-D convolution with kernel
                          = stride = c, initialised to the mean)
    L_attn = || attn(h, old) - attn(h, new_cm) ||^2

where attn is the layer's content-based attention (its own q, k, v projections, softmax of
q.k / sqrt(Dh), no position terms) over the given rows alone. h, old and the projections are
stop-gradient'ed, so L_attn trains the compression network only, and the language-model loss
never reaches it (compressed slots enter the state, which is constant to later segments). L_attn
is summed over layers, averaged over the valid query positions of rows that evicted something,
and reported by the train step as `compression_loss`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import dot_product_attention, param_with_axes
from memtx.layers import layer_norm, layer_tree
from memtx.memory import slots
from memtx.memory.compressive import state as compressive
from memtx.memory.kind import Segment, StackOutput
from memtx.memory.xl import layers as xl_layer
from memtx.memory.xl.layers import run_layers

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


class Compressor(nn.Module):
    """f_c of every layer: ([L, B, N, D] evicted block, [B, N] valid, valid last) ->
    ([L, B, N/c, D] groups, [B] number of groups holding evicted slots, the last ones)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, block_LBND, valid_BN):
        cfg, c = self.cfg, self.cfg.compressive.rate
        L, B, N, D = block_LBND.shape
        G = N // c
        x_LBGCD = jnp.where(valid_BN[None, :, :, None], block_LBND, 0).reshape(L, B, G, c, D)
        count_BG = valid_BN.reshape(B, G, c).sum(-1)
        if cfg.compressive.function == "mean":
            groups = x_LBGCD.sum(3) / jnp.maximum(count_BG, 1)[None, :, :, None].astype(x_LBGCD.dtype)
        else:  # conv: starts as the mean-pool
            mean_init = lambda key, shape, dtype=jnp.float32: (  # noqa: E731
                jnp.broadcast_to(jnp.eye(D, dtype=dtype) / c, shape) + cfg.init_std * jax.random.normal(key, shape, dtype))
            w_LCDE = param_with_axes(self, "kernel", (L, c, D, D), ("layers", None, "embed", None), mean_init)
            b_LD = param_with_axes(self, "bias", (L, D), ("layers", None), nn.initializers.zeros)
            groups = jnp.einsum("lbgcd,lcde->lbge", x_LBGCD, w_LCDE.astype(x_LBGCD.dtype)) + b_LD[:, None, None, :]
        num_groups_B = -(-valid_BN.sum(-1) // c)
        return groups.astype(block_LBND.dtype), num_groups_B.astype(jnp.int32)


def content_attention(cfg: ModelConfig, layer_params, h_BND, rows_BMD, rows_valid_BM):
    """A layer's content-based attention of h over `rows` alone: [B, N, H, Dh] (zeros where no row
    is valid). Everything stop-gradient'ed but `rows`."""
    p = jax.lax.stop_gradient(layer_params)
    h_BND = jax.lax.stop_gradient(h_BND)
    if cfg.pre_norm:  # the layer's attention sees normalised rows
        norm = p["attn_norm"]
        h_BND = layer_norm(h_BND, norm["scale"], norm["bias"], cfg.layer_norm_eps)
        rows_BMD = layer_norm(rows_BMD, norm["scale"], norm["bias"], cfg.layer_norm_eps)
    w = p["attn"]["qkv"].astype(rows_BMD.dtype)
    q = jnp.einsum("bnd,dhe->bnhe", h_BND.astype(rows_BMD.dtype), w[:, 0])
    k = jnp.einsum("bmd,dhe->bmhe", rows_BMD, w[:, 1])
    v = jnp.einsum("bmd,dhe->bmhe", rows_BMD, w[:, 2])
    return dot_product_attention(q, k, v, rows_valid_BM)


def reconstruction_loss(cfg: ModelConfig, params, inputs_LBND, num_valid_B, block_LBND, valid_BN, groups_LBGD,
                        num_groups_B):
    """L_attn summed over layers (module docstring)."""
    L, B, N, _ = inputs_LBND.shape
    G = groups_LBGD.shape[2]
    groups_valid_BG = slots.valid(num_groups_B, G)
    weight_BN = (jnp.arange(N)[None, :] < num_valid_B[:, None]) & valid_BN.any(-1)[:, None]
    denominator = jnp.maximum(jnp.sum(weight_BN), 1) * cfg.num_heads * cfg.dim_per_head
    total = jnp.float32(0)
    for layer in range(L):
        layer_params = layer_tree(params, layer)  # scanned (model.scan_layers) or not
        target = content_attention(cfg, layer_params, inputs_LBND[layer], block_LBND[layer], valid_BN)
        rebuilt = content_attention(cfg, layer_params, inputs_LBND[layer], groups_LBGD[layer], groups_valid_BG)
        error_BN = jnp.sum(jnp.square((target - rebuilt).astype(jnp.float32)), axis=(2, 3))
        total = total + jnp.sum(jnp.where(weight_BN, error_BN, 0.0)) / denominator
    return total


def scan_runs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The stack's layer ranges: those of the XL stack it runs."""
    return xl_layer.scan_runs(cfg)


def stack(model, segment: Segment, state: dict) -> StackOutput:
    """XL layers over [compressed ; memory]; then the evicted slots are compressed and both memories
    written. The attention-reconstruction loss is sown as ("losses", "compression")."""
    cfg = model.cfg
    num_valid_B = segment.num_valid_B
    h_BND, inputs_LBND, knn_stores, new_cache = run_layers(model, segment, compressive.rows(state),
                                                           compressive.valid_mask(state))
    if segment.cache is not None:  # generation inside a segment: memories are written by whole segments
        return StackOutput(h_BND, state, knn_stores, new_cache)
    if cfg.compressive.size == 0:  # nothing kept: the evicted slots are dropped, as Transformer-XL
        return StackOutput(h_BND, compressive.write(state, inputs_LBND, None, None, num_valid_B), knn_stores,
                           new_cache)
    block_LBND, valid_BN = compressive.evicted(state, inputs_LBND, num_valid_B)  # stop-gradient'ed
    groups_LBGD, num_groups_B = Compressor(cfg, name="compressor")(block_LBND, valid_BN)
    if cfg.compressive.loss_weight > 0:
        loss = reconstruction_loss(cfg, nn.meta.unbox(model.variables["params"]), inputs_LBND, num_valid_B, block_LBND,
                                   valid_BN, groups_LBGD, num_groups_B)
        model.sow("losses", "compression", cfg.compressive.loss_weight * loss)
    state = compressive.write(state, inputs_LBND, groups_LBGD, num_groups_B, num_valid_B)
    return StackOutput(h_BND, state, knn_stores, new_cache)
