"""LaMemo's Table 3 ablations (model.lamemo): each switch does exactly what it says."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import Config, ConfigError, KNNConfig, ModelConfig, validate
from memtx.memory.lamemo import LaMemoConfig
from memtx.memory.lamemo.layers import LaMemoAttention
from memtx.model import TransformerLM, init_memory, segment_nll


def _cfg(memory="lamemo", pre_norm=False, **lamemo):
    return ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                       mem_len=8, pre_norm=pre_norm, memory=memory, lamemo=LaMemoConfig(**lamemo))


def _init(cfg, seed=0):
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(seed), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                        jnp.zeros((2,), jnp.int32))["params"]
    params = nn.meta.unbox(params)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    return model, jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)


def _batch(tokens, reset, weights=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens + 1) % 40,
            "weights": jnp.ones(tokens.shape) if weights is None else jnp.asarray(weights, jnp.float32),
            "reset": jnp.asarray(reset)}


def _segments():
    rng = np.random.default_rng(0)
    weights = np.ones((2, 6))
    weights[1, 4:] = 0  # row 1's second segment ends its document early
    return [_batch(rng.integers(0, 40, (2, 6)), [True, True]),
            _batch(rng.integers(0, 40, (2, 6)), [False, False], weights),
            _batch(rng.integers(0, 40, (2, 6)), [False, True]),
            _batch(rng.integers(0, 40, (2, 6)), [False, False])]


def _xl_params(lamemo_params):
    """The same weights laid out for the Transformer-XL model (fused q/k/v projection)."""
    out = {}
    for name, value in lamemo_params.items():
        if name.startswith("layer_"):
            attn = dict(value["attn"])
            q, kv = attn.pop("q"), attn.pop("kv")
            value = {**value, "attn": {**attn, "qkv": jnp.stack([q, kv[:, 0], kv[:, 1]], axis=1)}}
        out[name] = value
    return out


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.slow
def test_without_look_ahead_the_forward_pass_is_transformer_xl(pre_norm):
    # Each slot keeps the attention output it had when it was current, and the layers recompute the
    # memory rows from it: exactly the hidden states Transformer-XL caches (the paper: 24.56 = XL).
    cfg = _cfg(pre_norm=pre_norm, look_ahead=False)
    model, params = _init(cfg)
    assert "v_minus_bias" not in params  # no look-ahead, no look-ahead bias
    xl_cfg = _cfg("xl", pre_norm=pre_norm)
    xl_model = TransformerLM(xl_cfg)
    memory, xl_memory = init_memory(cfg, 2), init_memory(xl_cfg, 2)
    for batch in _segments():
        nll, memory = segment_nll(model, params, memory, batch)
        xl_nll, xl_memory = segment_nll(xl_model, _xl_params(params), xl_memory, batch)
        np.testing.assert_allclose(nll, xl_nll, atol=2e-5, rtol=1e-5)
    # ... and the full LaMemo does not: its look-ahead changes the memory.
    full_model, _ = _init(_cfg(pre_norm=pre_norm))
    full_params = {**params, "v_minus_bias": jnp.zeros_like(params["u_bias"])}
    memory = init_memory(cfg, 2)
    for batch in _segments():
        full_nll, memory = segment_nll(full_model, full_params, memory, batch)
    assert not np.allclose(full_nll, xl_nll, atol=1e-3)


@pytest.mark.parametrize("interpolation", [True, False])
def test_without_interpolation_a_slot_forgets_its_carried_output(interpolation):
    cfg = _cfg(interpolation=interpolation)
    model, params = _init(cfg)
    segments = _segments()
    _, memory = segment_nll(model, params, init_memory(cfg, 2), segments[0])
    state = memory["lamemo"]
    perturbed = {**memory, "lamemo": {**state, "C": state["C"] + 1.0, "logS": state["logS"] + 2.0}}
    nll, new_memory, inter = segment_nll(model, params, memory, segments[3], with_intermediates=True)
    nll_p, new_memory_p = segment_nll(model, params, perturbed, segments[3])
    alpha = np.asarray(inter["layer_1"]["attn"]["alpha"][0])
    if interpolation:  # alpha > 0 mixes the carried output in
        assert alpha.min() > 0.0 and alpha.max() < 1.0
        assert not np.allclose(nll, nll_p, atol=1e-4)
    else:  # alpha = 0: what the slot held before this look-ahead does not matter
        np.testing.assert_array_equal(alpha, 0.0)
        np.testing.assert_allclose(nll, nll_p, atol=1e-5)
        np.testing.assert_allclose(new_memory["lamemo"]["C"], new_memory_p["lamemo"]["C"], atol=1e-5)


@pytest.mark.slow
def test_xl_encoding_is_the_signed_distance_with_the_look_back_bias():
    # sinusoid(-d) = [-sin(d), cos(d)]: the XL encoding's look-ahead equals the disentangled one's
    # with the sin rows of W_R negated and v_minus = v. Only the look-ahead (C', logS') is compared,
    # since the look-back path shares W_R.
    B, N, M, D = 2, 5, 7, 16
    xl_cfg, dis_cfg = _cfg(encoding="xl"), _cfg()
    rng = np.random.default_rng(1)
    x, mem = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, N, D), (B, M, D)))
    C, logS = jnp.asarray(rng.normal(size=(B, M, 2, 8)), jnp.float32), jnp.asarray(rng.normal(size=(B, M, 2)), jnp.float32)
    u, v, v_minus = (jnp.asarray(rng.normal(size=(2, 8)), jnp.float32) for _ in range(3))
    valid = jnp.ones((B, M), bool)
    attn = LaMemoAttention(xl_cfg)
    params = attn.init(jax.random.key(0), x, mem, valid, C, logS, u, v, None)["params"]
    params = jax.tree.map(lambda p: 3.0 * p, nn.meta.unbox(params))  # position terms that matter
    _, _, C_xl, logS_xl, _, _ = attn.apply({"params": params}, x, mem, valid, C, logS, u, v, None)
    sign_D = jnp.concatenate([-jnp.ones(D // 2), jnp.ones(D // 2)])
    flipped = {**params, "r_proj": params["r_proj"] * sign_D[:, None, None]}
    _, _, C_dis, logS_dis, _, _ = LaMemoAttention(dis_cfg).apply({"params": flipped}, x, mem, valid, C, logS, u, v, v)
    np.testing.assert_allclose(C_xl, C_dis, atol=1e-5)
    np.testing.assert_allclose(logS_xl, logS_dis, atol=1e-5)
    _, _, C_plain, _, _, _ = LaMemoAttention(dis_cfg).apply({"params": params}, x, mem, valid, C, logS, u, v, v_minus)
    assert not np.allclose(C_xl, C_plain, atol=1e-3)


def test_config_names_a_misplaced_option():
    for model, key in ((ModelConfig(lamemo=LaMemoConfig(look_ahead=False)), "model.lamemo.look_ahead"),
                       (ModelConfig(memory="lamemo", knn=KNNConfig(size=512)), "model.knn.size"),
                       (ModelConfig(memory="lamemo", knn=KNNConfig(enabled=True)), "model.knn.enabled"),
                       (ModelConfig(memory="lamemo", lamemo=LaMemoConfig(encoding="rope")),
                        "model.lamemo.encoding")):
        with pytest.raises(ConfigError) as info:
            validate(Config(model=model), 1)
        assert key in str(info.value) and "\n" not in str(info.value)
    for mem_len in (0, 3, 200):  # any memory length works, shorter or longer than a segment
        validate(Config(model=ModelConfig(memory="lamemo", mem_len=mem_len)), 1)
