"""The LaMemo state (spec §2): per-row resets, padding never written, no leaks in time, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import Config, ConfigError, KNNConfig, ModelConfig, validate
from memtx.memory import model_memory
from memtx.memory.lamemo import state as lamemo
from memtx.model import TransformerLM, init_memory, segment_nll
from tests.helpers import segment_batch, small_model


def test_write_keeps_newest_valid_positions_and_skips_padding():
    L, B, M, N, D, H, Dh = 1, 3, 4, 3, 1, 1, 1
    memory = lamemo.init(L, B, M, D, H, Dh)
    rows = jnp.arange(B)[:, None, None] * 100.0

    def write(memory, first, num_valid):
        emb_BND = rows + first + jnp.arange(N)[None, :, None]
        C_LBMHD = memory["C"] + 1000.0  # "refreshed" memory rows
        return lamemo.write(memory, emb_BND, C_LBMHD, memory["logS"] - 1.0, emb_BND[None, ..., None],
                            emb_BND[None], jnp.asarray(num_valid))

    memory = write(memory, 1, [3, 3, 2])
    memory = write(memory, 4, [3, 1, 0])
    np.testing.assert_array_equal(memory["length"], [4, 4, 2])
    mask = np.asarray(lamemo.valid_mask(memory))
    emb = np.asarray(memory["emb"][..., 0])
    np.testing.assert_array_equal(emb[0][mask[0]], [3, 4, 5, 6])  # oldest dropped, FIFO order
    np.testing.assert_array_equal(emb[1][mask[1]], [101, 102, 103, 104])  # only the 1 valid of seg2
    np.testing.assert_array_equal(emb[2][mask[2]], [201, 202])  # padding never written; state kept at n = 0
    C = np.asarray(memory["C"][0, :, :, 0, 0])
    np.testing.assert_array_equal(C[0][mask[0]], [1003, 4, 5, 6])  # carried rows refreshed, new rows appended
    np.testing.assert_array_equal(C[2][mask[2]], [201, 202])
    assert memory["logS"].dtype == jnp.float32


def test_reset_only_touches_flagged_rows():
    memory = {**lamemo.init(2, 2, 4, 3, 2, 5), "length": jnp.array([4, 3])}
    reset = lamemo.reset_rows(memory, jnp.array([True, False]))
    np.testing.assert_array_equal(reset["length"], [0, 3])
    np.testing.assert_array_equal(np.asarray(lamemo.valid_mask(reset)).sum(-1), [0, 3])


def _model_and_params(mem_len=8, pre_norm=False):
    return small_model(mem_len=mem_len, pre_norm=pre_norm, memory="lamemo")


def test_memory_zero_is_transformer_rpe():
    cfg, model, params = _model_and_params(mem_len=0)
    tokens = np.random.default_rng(3).integers(0, 40, (2, 6))
    memory = init_memory(cfg, 2)
    nll1, memory = segment_nll(model, params, memory, segment_batch(tokens, [True, True]))
    nll2, _ = segment_nll(model, params, memory, segment_batch(tokens, [False, False]))
    np.testing.assert_allclose(nll1, nll2, atol=1e-6)
    assert memory["lamemo"]["C"].shape[2] == 0


@pytest.mark.slow
def test_gradient_is_finite_with_empty_memory_slots():
    cfg, model, params = _model_and_params()
    tokens = np.random.default_rng(4).integers(0, 40, (2, 6))
    memory = model_memory.reset_rows(init_memory(cfg, 2), jnp.array([True, True]))
    _, memory = segment_nll(model, params, memory, segment_batch(tokens[:, :3], [True, True]))  # 3 of 8 slots valid
    grads = jax.jit(jax.grad(lambda p: segment_nll(model, p, memory, segment_batch(tokens, [False, False]))[0].mean()))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_config_rejects_unknown_memory_and_lamemo_with_knn():
    with pytest.raises(ConfigError) as info:
        validate(Config(model=ModelConfig(memory="lamemmo")), 1)
    assert "model.memory" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate(Config(model=ModelConfig(memory="lamemo", knn=KNNConfig(enabled=True))), 1)
    assert "lamemo" in str(info.value) and "\n" not in str(info.value)


def test_log_denominators_stay_float32_when_computing_in_bfloat16():
    cfg, model, params = _model_and_params()
    bf16_cfg = ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
    bf16_model = TransformerLM(bf16_cfg)
    rng = np.random.default_rng(5)
    memory, bf16_memory = init_memory(cfg, 2), init_memory(bf16_cfg, 2)
    for reset in ([True, True], [False, False], [False, False]):
        batch = segment_batch(rng.integers(0, 40, (2, 6)), reset)
        _, memory = segment_nll(model, params, memory, batch)
        _, bf16_memory, inter = segment_nll(bf16_model, params, bf16_memory, batch, with_intermediates=True)
    state = bf16_memory["lamemo"]
    assert state["C"].dtype == state["emb"].dtype == jnp.bfloat16
    assert state["logS"].dtype == inter["layer_0"]["attn"]["alpha"][0].dtype == jnp.float32
    logS = np.asarray(state["logS"])
    # Not rounded through bfloat16 on the way (its 8-bit mantissa would leave steps of 1/32 near 5) ...
    assert np.any(logS != np.asarray(state["logS"].astype(jnp.bfloat16).astype(jnp.float32)))
    # ... and close to the float32 model's accumulated denominators.
    np.testing.assert_allclose(logS, memory["lamemo"]["logS"], atol=0.1)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_skipping_the_last_layers_memory_rows_changes_nothing(pre_norm):
    # The last layer's refreshed memory rows feed nothing; the model leaves them out by default.
    cfg, model, params = _model_and_params(pre_norm=pre_norm)
    full = TransformerLM(cfg, last_memory_output=True)
    rng = np.random.default_rng(6)
    memory = full_memory = init_memory(cfg, 2)
    for reset in ([True, True], [False, False], [False, True]):
        batch = segment_batch(rng.integers(0, 40, (2, 6)), reset)
        nll, memory, inter = segment_nll(model, params, memory, batch, with_intermediates=True)
        full_nll, full_memory, full_inter = segment_nll(full, params, full_memory, batch, with_intermediates=True)
        np.testing.assert_allclose(nll, full_nll, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), memory, full_memory)
    assert "out_mem" not in inter["layer_1"] and "out_mem" in inter["layer_0"] and "out_mem" in full_inter["layer_1"]
