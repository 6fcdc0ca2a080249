"""model.clamp_len: relative distances beyond it are encoded as it (Transformer-XL's clamp_len)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.attention import distance_sinusoid, sinusoid
from memtx.config import Config, ConfigError, ModelConfig, validate
from memtx.model import TransformerLM, init_memory, segment_nll


def test_distances_beyond_the_clamp_share_its_encoding():
    d = jnp.arange(-9, 10)
    table = np.asarray(distance_sinusoid(d, 16, clamp_len=4))
    np.testing.assert_array_equal(table, np.asarray(sinusoid(jnp.clip(d, -4, 4), 16)))
    np.testing.assert_array_equal(np.asarray(distance_sinusoid(d, 16)), np.asarray(sinusoid(d, 16)))
    assert not np.allclose(table[0], table[-1])  # -9 -> -4 and 9 -> 4: the sign survives


@pytest.mark.parametrize("memory", ["xl", "lamemo"])
@pytest.mark.slow
def test_clamping_only_changes_distances_beyond_it(memory):
    N, M = 6, 6  # distances 0..M+N-1 = 11
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                      mem_len=M, memory=memory)
    model = TransformerLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((2, N), jnp.int32), init_memory(cfg, 2),
                                      jnp.zeros((2,), jnp.int32))["params"])
    params = jax.tree.map(lambda p: 3.0 * p, params)
    rng = np.random.default_rng(0)
    segments = [rng.integers(0, 40, (2, N)) for _ in range(3)]

    def run(clamp_len):
        c = dataclasses.replace(cfg, clamp_len=clamp_len)
        memory, out = init_memory(c, 2), []
        for t, tokens in enumerate(segments):
            batch = {"inputs": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray((tokens + 1) % 40, jnp.int32),
                     "weights": jnp.ones((2, N)), "reset": jnp.full((2,), t == 0)}
            nll, memory = segment_nll(TransformerLM(c), params, memory, batch)
            out.append(np.asarray(nll))
        return np.stack(out)

    unclamped = run(0)
    np.testing.assert_array_equal(run(M + N - 1), unclamped)  # nothing is that far
    assert not np.allclose(run(3), unclamped, atol=1e-4)


def test_negative_clamp_is_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        validate(Config(model=ModelConfig(clamp_len=-1)), 1)
    assert "model.clamp_len" in str(info.value) and "\n" not in str(info.value)
