"""The XL memory state: FIFO writes skip padding, resets are per row, nothing leaks in time."""

import jax.numpy as jnp
import numpy as np

from memtx.memory.xl import state as xl
from memtx.model import init_memory, segment_nll
from tests.helpers import segment_batch, small_model


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
    return small_model(mem_len=mem_len, pre_norm=pre_norm)


def test_memory_zero_is_transformer_rpe():
    cfg, model, params = _model_and_params(mem_len=0)
    tokens = np.random.default_rng(3).integers(0, 40, (2, 6))
    memory = init_memory(cfg, 2)
    nll1, memory = segment_nll(model, params, memory, segment_batch(tokens, [True, True]))
    nll2, _ = segment_nll(model, params, memory, segment_batch(tokens, [False, False]))
    np.testing.assert_allclose(nll1, nll2, atol=1e-6)  # nothing carried between segments
    assert memory["xl"]["hidden"].shape[2] == 0
