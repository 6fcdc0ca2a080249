"""The kNN layer against the official implementation (google-research/meliad) and spec §3:
retrieval with the normalised q alone (no content bias u), an empty store reads zeros so the
output is (1-g)·a_local, the memory in the 4th layer from the top, and `model.qk_norm` so that a
Transformer-XL baseline differs from its kNN model in the memory alone."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import Config, KNNConfig, ModelConfig, apply_override
from memtx.model import TransformerLM, init_memory, segment_nll

ROOT = Path(__file__).resolve().parents[1]


def model_and_params(knn: bool, qk_norm: bool = False, mem_len: int = 6, size: int = 16, gate_bias: float = 0.0,
                     layers=(1,), content_bias: bool = True):
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                      mem_len=mem_len, qk_norm=qk_norm, content_bias=content_bias,
                      knn=KNNConfig(enabled=knn, layers=layers if knn else (), size=size, k=4, gate_bias_init=gate_bias))
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                        jnp.zeros((2,), jnp.int32))["params"]
    noise = lambda p, i: p + 0.3 * jax.random.normal(jax.random.key(i), p.shape)  # noqa: E731
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    return cfg, model, jax.tree.unflatten(tree, [noise(p, i) for i, p in enumerate(leaves)])


def batch(tokens, reset):
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens * 7 + 1) % 40, "weights": jnp.ones(tokens.shape),
            "reset": jnp.asarray(reset)}


@pytest.mark.slow
def test_empty_store_reads_zeros_so_the_output_is_one_minus_g_times_local_attention():
    """With one gate value for every head, out = W_O((1-g)·a_local) = (1-g)·W_O(a_local): the kNN
    layer's attention projection on an empty store is (1-g) times the same layer's without a store."""
    rng = np.random.default_rng(0)
    b = batch(rng.integers(0, 40, (2, 6)), [True, True])
    cfg, model, params = model_and_params(knn=True, qk_norm=True, gate_bias=0.7)
    params["layer_1"]["attn"]["gate_bias"] = jnp.full((2,), 0.7)
    g = float(jax.nn.sigmoid(0.7))
    base_cfg, base_model, _ = model_and_params(knn=False, qk_norm=True)
    base_params = jax.tree.map(lambda x: x, params)
    del base_params["layer_1"]["attn"]["gate_bias"]

    def attn_projection(model_, params_, cfg_):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == "attn" and context.method_name == "__call__" \
                    and context.module.parent.name == "layer_1":
                captured["out"] = out[0]
            return out

        with nn.intercept_methods(interceptor):
            segment_nll(model_, params_, init_memory(cfg_, 2), b)
        return np.asarray(captured["out"])

    with_store = attn_projection(model, params, cfg)
    local = attn_projection(base_model, base_params, base_cfg)
    np.testing.assert_allclose(with_store, (1 - g) * local, rtol=1e-5, atol=1e-6)
    assert not np.allclose(with_store, local, atol=1e-3)  # not "a_local alone"
    # The same holds for a store of size 0: it is always empty.
    cfg0, model0, _ = model_and_params(knn=True, qk_norm=True, size=0, gate_bias=0.7)
    np.testing.assert_allclose(attn_projection(model0, params, cfg0), (1 - g) * local, rtol=1e-5, atol=1e-6)


def test_retrieval_uses_the_normalised_q_and_ignores_the_content_bias_u():
    """One attention layer: the memory probabilities equal a softmax, over the k best stored keys,
    of scale·(q̂·k̂) with q̂ the normalised query without u, whatever u is."""
    from memtx.attention import RelativeAttention, l2_normalize
    from memtx.memory import knn
    cfg = ModelConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, mem_len=0,
                      knn=KNNConfig(enabled=True, layers=(0,), size=8, k=3))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 5, 16)), jnp.float32)
    u = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
    store = knn.init(1, 2, 8, 8)
    stored = l2_normalize(jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32))
    store = knn.write(store, stored, jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32), jnp.array([6]))
    layer = RelativeAttention(cfg)
    empty_mem = jnp.zeros((1, 0, 16)), jnp.zeros((1, 0), bool)
    params = layer.init(jax.random.key(0), x, *empty_mem, u, v, True, store)["params"]
    params = nn.meta.unbox(params)
    for bias in (u, u + 5.0):
        (_, _), state = layer.apply({"params": params}, x, *empty_mem, bias, v, True, store, mutable=["intermediates"])
        probs, = state["intermediates"]["knn_probs"]
        q = l2_normalize(jnp.einsum("bnd,dhk->bhnk", x, params["qkv"][:, 0]))  # [B, H, N, D]
        scores = np.einsum("hnd,hsd->hns", np.asarray(q[0]), np.asarray(store["keys"][0, :, :6]))
        top = -np.sort(-scores, axis=-1)[..., :3] * np.exp(np.asarray(params["log_scale"]))[:, None, None]
        expected = np.exp(top - top.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(probs[0]), expected, rtol=1e-5, atol=1e-6)


def test_qk_norm_baseline_differs_from_the_knn_model_in_the_memory_alone():
    """Same parameters but the gate: with the gate closed (g -> 0) the kNN model computes exactly
    the qk_norm Transformer-XL baseline, however full its store."""
    cfg, model, params = model_and_params(knn=True, qk_norm=True)
    base_cfg, base_model, base_params = model_and_params(knn=False, qk_norm=True)
    knn_tree = jax.tree_util.tree_structure(params)
    del params["layer_1"]["attn"]["gate_bias"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(base_params)
    assert "log_scale" in base_params["layer_0"]["attn"] and "log_scale" in base_params["layer_1"]["attn"]
    params = jax.tree.unflatten(jax.tree_util.tree_structure(base_params), jax.tree.leaves(base_params))
    closed = {**params, "layer_1": {**params["layer_1"], "attn": {**params["layer_1"]["attn"],
                                                                   "gate_bias": jnp.full((2,), -40.0)}}}
    assert jax.tree_util.tree_structure(closed) == knn_tree
    rng = np.random.default_rng(3)
    mem, base_mem = init_memory(cfg, 2), init_memory(base_cfg, 2)
    for s in range(3):
        b = batch(rng.integers(0, 40, (2, 6)), [s == 0, s == 0])
        nll, mem = segment_nll(model, closed, mem, b)
        base_nll, base_mem = segment_nll(base_model, base_params, base_mem, b)
        np.testing.assert_allclose(nll, base_nll, rtol=1e-5, atol=1e-5)
    assert int(mem["knn"]["1"]["count"][0]) == 16  # the store was full: only the gate hid it


def test_without_the_content_bias_the_model_is_the_one_with_u_set_to_zero():
    """`model.content_bias=False` (meliad's attention has no key-only term u.k): no `u_bias`
    parameter, and the model computes what the default model computes with u = 0 (a kNN model,
    across segments and a document reset), which differs from it with its u."""
    cfg, model, params = model_and_params(knn=True, content_bias=False)
    _, with_u_model, with_u_params = model_and_params(knn=True)
    assert "u_bias" not in params and "u_bias" in with_u_params
    params = {**params, **{k: v for k, v in with_u_params.items() if k != "u_bias"}}  # same weights otherwise
    zero_u = {**with_u_params, "u_bias": jnp.zeros_like(with_u_params["u_bias"])}
    rng = np.random.default_rng(5)
    mems = [init_memory(cfg, 2) for _ in range(3)]
    differs = False
    for s in range(4):
        b = batch(rng.integers(0, 40, (2, 6)), [s in (0, 2), s == 0])
        nll, mems[0] = segment_nll(model, params, mems[0], b)
        zero_nll, mems[1] = segment_nll(with_u_model, zero_u, mems[1], b)
        u_nll, mems[2] = segment_nll(with_u_model, with_u_params, mems[2], b)
        np.testing.assert_allclose(nll, zero_nll, rtol=1e-5, atol=1e-5)
        differs |= not np.allclose(nll, u_nll, atol=1e-4)
    assert differs  # u matters when it is there: the comparison above is not vacuous


def test_layer_syntax_default_layer_and_paper_presets():
    cfg = Config()
    apply_override(cfg, "model.knn.layers", "9,")
    assert cfg.model.knn.layers == (9,)
    apply_override(cfg, "model.knn.layers", "2,5")
    assert cfg.model.knn.layers == (2, 5)
    apply_override(cfg, "model.knn.layers", "(7,)")
    assert cfg.model.knn.layers == (7,)
    assert KNNConfig(enabled=True).layer_indices(12) == (8,)
    assert KNNConfig(enabled=True).layer_indices(6) == (2,)
    spec = importlib.util.spec_from_file_location("knn_presets", ROOT / "configs" / "knn.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    for name in ("paper_8192", "paper_65536_xl"):
        m = presets.get_config(name).model
        assert m.knn.layer_indices(m.num_layers) == (8,) and m.num_layers - 1 not in m.knn.layer_indices(m.num_layers)


def test_qk_norm_with_lamemo_is_a_one_line_error():
    from memtx.config import ConfigError, validate
    cfg = Config()
    cfg.model.memory, cfg.model.qk_norm = "lamemo", True
    with pytest.raises(ConfigError, match="model.qk_norm"):
        validate(cfg, 8)
