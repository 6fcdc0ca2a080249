"""The blocks every layer kind shares: LayerNorm and the ReLU feed-forward network."""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import param_with_axes

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
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


# --- model.scan_layers: identical consecutive layers as one scan -------------------------------

def layer_runs(cfg: ModelConfig, unrolled=()) -> list[tuple[int, int]]:
    """The stack as consecutive layer ranges [a, b). With `cfg.scan_layers` each layer in `unrolled`
    (one that differs from the rest) is a range of its own and the others form maximal ranges, each
    run as one scan; without it every layer is its own range."""
    L = cfg.num_layers
    if not cfg.scan_layers:
        return [(layer, layer + 1) for layer in range(L)]
    runs, start = [], 0
    for layer in sorted(set(unrolled)) + [L]:
        if layer > start:
            runs.append((start, layer))
        if layer < L:
            runs.append((layer, layer + 1))
        start = layer + 1
    return runs


def run_name(a: int, b: int) -> str:
    """The module name of layers [a, b): "layer_3" for one layer, "layers_0_to_2" for a scanned run."""
    return f"layer_{a}" if b - a == 1 else f"layers_{a}_to_{b - 1}"


_RUN = re.compile(r"layers_(\d+)_to_(\d+)$")


class _ScanBody(nn.Module):
    """One iteration of a scanned run: the layer (named "layer", its parameters one slice of the
    run's stacked ones) applied by `body(layer, carry, xs, shared) -> (carry, ys)`."""

    cls: Any
    cfg: ModelConfig
    body: Callable
    layer_kwargs: tuple = ()

    @nn.compact
    def __call__(self, carry, xs, shared):
        layer = layer_class(self.cls, self.cfg)(self.cfg, name="layer", **dict(self.layer_kwargs))
        return self.body(layer, carry, xs, shared)


def scan_run(cls, cfg: ModelConfig, a: int, b: int, body: Callable, carry, xs, shared, **layer_kwargs):
    """Layers [a, b) of class `cls` as one `nn.scan` (called inside the model's compact method):
    `xs` (arrays with a leading axis of b - a) are sliced per layer, `shared` is given to every
    layer, parameters and sown intermediates are stacked on a leading "layers" axis, each layer
    draws its own init and dropout keys. Returns (carry, ys stacked on a leading axis)."""
    scanned = nn.scan(_ScanBody, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast), length=b - a,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cls, cfg, body, tuple(layer_kwargs.items()), name=run_name(a, b))(carry, xs, shared)


def stack_trees(trees: list):
    """[tree] -> one tree whose leaves are stacked on a new leading axis (None stays None)."""
    return None if trees[0] is None else jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack_tree(tree, n: int) -> list:
    return [None if tree is None else jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def layer_tree(tree: dict, layer: int):
    """Layer `layer`'s subtree of a parameter or intermediates tree, scanned or not: `tree["layer_3"]`,
    or its slice of the run "layers_a_to_b" that holds it."""
    if f"layer_{layer}" in tree:
        return tree[f"layer_{layer}"]
    for name, sub in tree.items():
        run = _RUN.match(name)
        if run and int(run[1]) <= layer <= int(run[2]):
            return jax.tree.map(lambda x: x[layer - int(run[1])], sub["layer"])
    raise KeyError(f"no layer {layer} in a tree with {', '.join(tree)}")


def stack_params(params: dict, runs: list[tuple[int, int]]) -> dict:
    """Unrolled parameters ("layer_0", "layer_1", ...) in the scanned layout of `runs` (a stack's
    `scan_runs(cfg)`): a checkpoint written without `model.scan_layers` for a model with it."""
    out = {k: v for k, v in params.items() if not re.fullmatch(r"layer_\d+", k)}
    for a, b in runs:
        layers = [params[f"layer_{layer}"] for layer in range(a, b)]
        out[run_name(a, b)] = layers[0] if b - a == 1 else {"layer": stack_trees(layers)}
    return out


def unstack_params(params: dict) -> dict:
    """Scanned parameters back in the unrolled layout (the inverse of `stack_params`)."""
    out = {}
    for name, sub in params.items():
        run = _RUN.match(name)
        if not run:
            out[name] = sub
            continue
        for i, layer in enumerate(range(int(run[1]), int(run[2]) + 1)):
            out[f"layer_{layer}"] = jax.tree.map(lambda x, i=i: x[i], sub["layer"])
    return out
