"""The blocks every layer kind shares: LayerNorm and the ReLU feed-forward network."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import param_with_axes
from memtx.config import ModelConfig


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        scale = param_with_axes(self, "scale", (D,), ("embed",), nn.initializers.ones)
        bias = param_with_axes(self, "bias", (D,), ("embed",), nn.initializers.zeros)
        return layer_norm(x, scale, bias, self.eps)


class FeedForward(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BND, deterministic: bool = True):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        wi = param_with_axes(self, "wi", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), init)
        bi = param_with_axes(self, "bi", (cfg.d_ff,), ("mlp",), nn.initializers.zeros)
        wo = param_with_axes(self, "wo", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), init)
        bo = param_with_axes(self, "bo", (cfg.d_model,), ("embed",), nn.initializers.zeros)
        h_BNF = jax.nn.relu(x_BND.astype(dtype) @ wi.astype(dtype) + bi.astype(dtype))
        h_BNF = nn.with_logical_constraint(h_BNF, ("act_batch", "act_seq", "act_mlp"))
        h_BNF = nn.Dropout(cfg.dropout)(h_BNF, deterministic=deterministic)
        return h_BNF @ wo.astype(dtype) + bo.astype(dtype)


def layer_parts(cfg: ModelConfig):
    """(ffn, attn_norm, ffn_norm, dropout) of a layer, under the names every layer kind gives
    them; called inside a layer's compact __call__, they become its submodules."""
    return (FeedForward(cfg, name="ffn"), LayerNorm(cfg.layer_norm_eps, name="attn_norm"),
            LayerNorm(cfg.layer_norm_eps, name="ffn_norm"), nn.Dropout(cfg.dropout))


def layer_class(cls: type[nn.Module], cfg: ModelConfig) -> type[nn.Module]:
    """The layer class a stack builds: `cls`, or with `cfg.remat` (a jax.checkpoint_policies name,
    config.REMAT_POLICIES) its rematerialised version, whose activations are recomputed in the backward pass except what
    the policy saves. The layer's `deterministic` argument is static (a Python bool)."""
    if not cfg.remat:
        return cls
    static = list(inspect.signature(cls.__call__).parameters).index("deterministic")  # self is 0
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, cfg.remat), static_argnums=(static,))
