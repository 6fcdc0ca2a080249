"""The XL memory state: FIFO writes skip padding, resets are per row, nothing leaks in time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import ModelConfig
from memtx.memory import xl
from memtx.model import TransformerLM, init_memory, segment_nll


def test_write_keeps_newest_valid_positions_and_skips_padding():
    L, B, M, N, D = 2, 3, 4, 3, 1
    memory = xl.init(L, B, M, D)
    rows = jnp.arange(B)[None, :, None, None] * 100
    seg1 = rows + 1 + jnp.arange(N)[None, None, :, None] + jnp.zeros((L, 1, 1, 1))  # values 1,2,3 (+100 b)
    memory = xl.write(memory, seg1, jnp.array([3, 3, 2]))
    np.testing.assert_array_equal(memory["length"], [3, 3, 2])
    seg2 = rows + 4 + jnp.arange(N)[None, None, :, None] + jnp.zeros((L, 1, 1, 1))  # values 4,5,6
    memory = xl.write(memory, seg2, jnp.array([3, 1, 0]))
    np.testing.assert_array_equal(memory["length"], [4, 4, 2])
    mask = np.asarray(xl.valid_mask(memory))
    h = np.asarray(memory["hidden"][0, :, :, 0])
    np.testing.assert_array_equal(h[0][mask[0]], [3, 4, 5, 6])  # oldest dropped, FIFO order
    np.testing.assert_array_equal(h[1][mask[1]], [101, 102, 103, 104])  # only the 1 valid of seg2
    np.testing.assert_array_equal(h[2][mask[2]], [201, 202])  # padding (3, 4..6) never written


def test_reset_only_touches_flagged_rows():
    memory = xl.write(xl.init(1, 2, 4, 2), jnp.ones((1, 2, 3, 2)), jnp.array([3, 3]))
    reset = xl.reset_rows(memory, jnp.array([True, False]))
    np.testing.assert_array_equal(reset["length"], [0, 3])
    np.testing.assert_array_equal(np.asarray(xl.valid_mask(reset)).sum(-1), [0, 3])


def _model_and_params(mem_len=8, pre_norm=False):
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                      mem_len=mem_len, pre_norm=pre_norm)
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                        jnp.zeros((2,), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), nn.meta.unbox(params))
    return cfg, model, params


def _batch(tokens, reset, weights=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens + 1) % 40,
            "weights": jnp.ones(tokens.shape) if weights is None else jnp.asarray(weights, jnp.float32),
            "reset": jnp.asarray(reset)}


@pytest.mark.parametrize("pre_norm", [False, True])
def test_no_information_from_the_future_or_other_rows(pre_norm):
    cfg, model, params = _model_and_params(pre_norm=pre_norm)
    rng = np.random.default_rng(0)
    seg_a = rng.integers(0, 40, (2, 6))
    seg_b = seg_a.copy()
    seg_b[0, 4:] = (seg_b[0, 4:] + 7) % 40  # change the future of row 0
    seg_b[1] = (seg_b[1] + 3) % 40  # change all of row 1
    memory = init_memory(cfg, 2)
    nll_a, _ = segment_nll(model, params, memory, _batch(seg_a, [True, True]))
    nll_b, _ = segment_nll(model, params, memory, _batch(seg_b, [True, True]))
    # Row 0 positions before 4 see the same past only; targets differ only where inputs do.
    np.testing.assert_allclose(nll_a[0, :4], nll_b[0, :4], atol=1e-6)
    assert not np.allclose(nll_a[0, 4:], nll_b[0, 4:])


def test_reset_row_forgets_the_previous_document():
    cfg, model, params = _model_and_params()
    rng = np.random.default_rng(1)
    history = rng.integers(0, 40, (2, 6))
    current = rng.integers(0, 40, (2, 6))
    _, memory = segment_nll(model, params, init_memory(cfg, 2), _batch(history, [True, True]))
    with_reset, _ = segment_nll(model, params, memory, _batch(current, [True, False]))
    fresh, _ = segment_nll(model, params, init_memory(cfg, 2), _batch(current, [True, True]))
    np.testing.assert_allclose(with_reset[0], fresh[0], atol=1e-6)  # row 0 starts a new document
    assert not np.allclose(with_reset[1], fresh[1])  # row 1 continues and uses its memory


def test_padded_segment_writes_the_same_memory_as_a_short_segment():
    cfg, model, params = _model_and_params()
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 40, (2, 6))
    padded = tokens.copy()
    padded[:, 4:] = 0
    weights = np.ones((2, 6))
    weights[:, 4:] = 0
    _, mem_padded = segment_nll(model, params, init_memory(cfg, 2), _batch(padded, [True, True], weights))
    _, mem_short = segment_nll(model, params, init_memory(cfg, 2), _batch(tokens[:, :4], [True, True]))
    np.testing.assert_array_equal(mem_padded["xl"]["length"], [4, 4])
    np.testing.assert_allclose(mem_padded["xl"]["hidden"][:, :, -4:], mem_short["xl"]["hidden"][:, :, -4:], atol=1e-6)


def test_memory_zero_is_transformer_rpe():
    cfg, model, params = _model_and_params(mem_len=0)
    tokens = np.random.default_rng(3).integers(0, 40, (2, 6))
    memory = init_memory(cfg, 2)
    nll1, memory = segment_nll(model, params, memory, _batch(tokens, [True, True]))
    nll2, _ = segment_nll(model, params, memory, _batch(tokens, [False, False]))
    np.testing.assert_allclose(nll1, nll2, atol=1e-6)  # nothing carried between segments
    assert memory["xl"]["hidden"].shape[2] == 0
