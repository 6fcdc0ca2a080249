"""Smeared keys (`model.smeared_keys`, Olsson et al. 2022): each head's key mixed with the
previous position's by a learned per-head weight, against a direct computation; at weight 1 the
layer is the plain one; the layers that have them run unscanned. Generation with them is in
test_generate (its "knn_smeared" case)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import segment_batch, small_model
from memtx.attention import RelativeAttention
from memtx.config import Config, ConfigError, KNNConfig, ModelConfig, validate
from memtx.model import TransformerLM, init_memory
from memtx.memory.xl.layers import scan_runs


def test_smeared_keys_equal_their_definition_over_memory_and_segment():
    cfg = ModelConfig(d_model=16, num_heads=2, d_ff=32, mem_len=3, init_std=0.5)
    rng = np.random.default_rng(0)
    B, M, N, D, H, Dh = 2, 3, 5, 16, 2, 8
    x, mem = rng.normal(size=(B, N, D)).astype(np.float32), rng.normal(size=(B, M, D)).astype(np.float32)
    mem_valid = np.array([[False, True, True], [False, False, False]])  # row 1: an empty memory
    zeros = jnp.zeros((H, Dh))
    attn = RelativeAttention(cfg, smear_keys=True)
    params = nn.meta.unbox(attn.init(jax.random.key(0), x, mem, mem_valid, zeros, zeros)["params"])
    params = {**params, "smear": jnp.array([-1.0, 2.0])}
    _, cache = attn.apply({"params": params}, x, mem, mem_valid, zeros, zeros)

    rows = np.concatenate([mem, x], axis=1)  # [B, M + N, D]
    raw = np.einsum("bkd,dhe->bkhe", rows, np.asarray(params["qkv"])[:, 1])
    valid = np.concatenate([mem_valid, np.ones((B, N), bool)], axis=1)
    s = 1 / (1 + np.exp(-np.array([-1.0, 2.0])))[:, None]
    expected = np.empty_like(raw)
    for b in range(B):
        for j in range(M + N):
            prev = raw[b, j - 1] if j > 0 and valid[b, j - 1] else 0.0
            expected[b, j] = s * raw[b, j] + (1 - s) * prev
    np.testing.assert_allclose(np.asarray(cache["k_raw"]), raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache["k"]), expected, rtol=1e-5, atol=1e-5)
    # The first segment row follows a valid memory row in row 0, and nothing in row 1.
    assert not np.allclose(expected[0, M], s * raw[0, M]) and np.allclose(expected[1, M], s * raw[1, M])


@pytest.mark.parametrize("extra", [{}, {"knn": {"enabled": True, "layers": (1,), "size": 8, "k": 2}}],
                         ids=["xl", "knn"])
def test_a_smear_weight_of_one_is_the_plain_layer_and_a_lower_one_is_not(extra):
    model_kwargs = {"knn": KNNConfig(**extra["knn"])} if extra else {}
    cfg, lm, params = small_model(smeared_keys=(0, 1), **model_kwargs)
    plain_cfg = dataclasses.replace(cfg, smeared_keys=())
    plain_params = jax.tree.map(lambda p: p, params)
    for layer in ("layer_0", "layer_1"):
        plain_params[layer]["attn"] = {k: v for k, v in params[layer]["attn"].items() if k != "smear"}
    assert "smear" in params["layer_0"]["attn"] and "smear" not in plain_params["layer_1"]["attn"]
    tokens = np.random.default_rng(0).integers(0, 40, (2, 6))

    def logits(cfg, params):
        memory = init_memory(cfg, 2)
        out = []
        for t in range(3):  # three segments: the memories fill
            batch = segment_batch(tokens + t, np.array([t == 0, t == 0]))
            lg, memory = TransformerLM(cfg).apply({"params": params}, batch["inputs"], memory, jnp.full((2,), 6))
            out.append(np.asarray(lg))
        return np.stack(out)

    plain = logits(plain_cfg, plain_params)
    for layer in ("layer_0", "layer_1"):
        params[layer]["attn"]["smear"] = jnp.full((2,), 40.0)  # sigmoid(40) = 1 in float32
    np.testing.assert_allclose(logits(cfg, params), plain, rtol=1e-5, atol=1e-5)
    params["layer_1"]["attn"]["smear"] = jnp.zeros((2,))
    assert np.abs(logits(cfg, params) - plain).max() > 1e-3


def test_layers_with_smeared_keys_run_unscanned_and_bad_settings_are_one_line_errors():
    cfg = ModelConfig(num_layers=5, scan_layers=True, smeared_keys=(1,))
    assert scan_runs(cfg) == [(0, 1), (1, 2), (2, 5)]
    for model, match in ((dict(smeared_keys=(4,)), "outside 0..3"),
                         (dict(smeared_keys=(0,), memory="lamemo"), "applies with model.memory 'xl' only")):
        with pytest.raises(ConfigError, match=match) as info:
            validate(Config(model=ModelConfig(**model)), 8)
        assert "\n" not in str(info.value)
