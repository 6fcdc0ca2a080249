"""The memory layer's options (issue 27): from meliad, local attention without relative positions
(`model.knn.position_terms=false`) and the attention scale's initial value
(`model.qk_scale_init`); the store queried with q̂ + u as before the meliad fixes
(`model.knn.query_content_bias`, an ablation). Each against a direct computation; off, the layer
is as before (every other test). Generation with the first two is in test_generate (its
"knn_smeared" case)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import segment_batch, small_model
from memtx.config import Config, ConfigError, KNNConfig, ModelConfig, validate
from memtx.model import TransformerLM, init_memory

KNN = dict(enabled=True, layers=(1,), size=8, k=2)


def logits(cfg, params, tokens):
    """Three segments of a 2-row batch, the memories carried: logits [3, 2, 6, V]."""
    memory, out = init_memory(cfg, 2), []
    for t in range(3):
        batch = segment_batch(tokens + t, np.array([t == 0, t == 0]))
        lg, memory = TransformerLM(cfg).apply({"params": params}, batch["inputs"], memory, jnp.full((2,), 6))
        out.append(np.asarray(lg))
    return np.stack(out)


def test_a_memory_layer_without_position_terms_is_one_whose_position_projection_is_zero():
    tokens = np.random.default_rng(0).integers(0, 40, (2, 6))
    cfg, _, params = small_model(knn=KNNConfig(**KNN, position_terms=False))
    assert "r_proj" not in params["layer_1"]["attn"] and "r_proj" in params["layer_0"]["attn"]
    with_positions, _, _ = small_model(knn=KNNConfig(**KNN))
    zeroed = jax.tree.map(lambda p: p, params)
    zeroed["layer_1"]["attn"] = {**params["layer_1"]["attn"],
                                 "r_proj": jnp.zeros((16, 2, 8))}  # [D, H, Dh]
    expected = logits(with_positions, zeroed, tokens)
    np.testing.assert_allclose(logits(cfg, params, tokens), expected, rtol=1e-5, atol=1e-5)
    zeroed["layer_1"]["attn"]["r_proj"] = jnp.full((16, 2, 8), 0.3)  # the term is there when on
    assert np.abs(logits(with_positions, zeroed, tokens) - expected).max() > 1e-3


@pytest.mark.parametrize("model", [dict(knn=KNNConfig(**KNN)), dict(qk_norm=True)], ids=["knn", "qk_norm"])
def test_the_attention_scale_starts_where_qk_scale_init_says(model):
    import flax.linen as nn
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32, mem_len=4,
                      **model)
    inputs = (jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2), jnp.full((2,), 6, jnp.int32))
    trees = {}
    for init in (0.0, 1.0, 3.0):
        c = ModelConfig(**{**cfg.__dict__, "qk_scale_init": init})
        trees[init] = nn.meta.unbox(TransformerLM(c).init(jax.random.key(0), *inputs)["params"])
    layers = ["layer_1"] if "knn" in model else ["layer_0", "layer_1"]
    for init, expected in ((0.0, math.sqrt(8)), (1.0, 1.0), (3.0, 3.0)):  # 0: sqrt(head_dim 8)
        for layer in layers:
            np.testing.assert_allclose(np.exp(trees[init][layer]["attn"]["log_scale"]), [expected] * 2, rtol=1e-6)
    # every other parameter is the same
    strip = lambda t: {k: {**v, "attn": {a: w for a, w in v["attn"].items() if a != "log_scale"}} if k in layers else v
                       for k, v in t.items()}
    jax.tree.map(np.testing.assert_array_equal, strip(trees[0.0]), strip(trees[1.0]))


@pytest.mark.parametrize("with_u", [False, True])
def test_the_store_is_queried_with_q_hat_or_with_q_hat_plus_u(with_u):
    """The top retrieved entry's score is max_j query . k_j over the stored (normalised) keys, with
    query = q / |q| (meliad) or q / |q| + u (model.knn.query_content_bias)."""
    import flax.linen as nn
    from memtx.attention import RelativeAttention
    from memtx.memory import knn
    cfg = ModelConfig(d_model=16, num_heads=2, d_ff=32, mem_len=0,
                      knn=KNNConfig(enabled=True, layers=(0,), size=8, k=2, backend="exact", query_content_bias=with_u))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    keys = rng.normal(size=(1, 8, 2, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    store = knn.write(knn.init(1, 2, 8, 8), jnp.asarray(keys), jnp.asarray(rng.normal(size=(1, 8, 2, 8)), jnp.float32),
                      jnp.array([8]))
    u = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    empty, none = jnp.zeros((1, 0, 16)), jnp.zeros((1, 0), bool)
    attn = RelativeAttention(cfg)
    params = attn.init(jax.random.key(0), x, empty, none, u, u, knn_memory=store)["params"]
    _, state = attn.apply({"params": params}, x, empty, none, u, u, knn_memory=store, mutable=["intermediates"])
    top1_BHN, valid = state["intermediates"]["knn_top1"][0]
    q = np.einsum("bnd,dhe->bnhe", x, np.asarray(nn.meta.unbox(params)["qkv"])[:, 0])
    query = q / np.linalg.norm(q, axis=-1, keepdims=True) + (np.asarray(u) if with_u else 0.0)
    expected_BHN = np.einsum("bnhe,bshe->bhns", query, keys).max(-1)
    assert np.asarray(valid).all()
    np.testing.assert_allclose(np.asarray(top1_BHN), expected_BHN, rtol=1e-4, atol=1e-4)


def test_bad_memory_layer_options_are_one_line_errors():
    for model, match in ((dict(qk_scale_init=-1.0), "model.qk_scale_init' must be >= 0"),
                         (dict(qk_scale_init=1.0), "applies to layers with normalised q and k"),
                         (dict(memory="lamemo", knn=KNNConfig(position_terms=False)), "model.knn.position_terms"),
                         (dict(content_bias=False, knn=KNNConfig(enabled=True, query_content_bias=True)),
                          "model.knn.query_content_bias")):
        with pytest.raises(ConfigError, match=match) as info:
            validate(Config(model=ModelConfig(**model)), 8)
        assert "\n" not in str(info.value)
    validate(Config(model=ModelConfig(qk_scale_init=1.0, qk_norm=True)), 8)
