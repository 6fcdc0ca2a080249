"""A train step on a (2, 2, 2) data x fsdp x model mesh equals the same step on one device."""

import jax
import numpy as np
import pytest

from memtx.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from memtx import state as state_lib
from memtx.step import make_train_step
from tests.helpers import random_batches


def tiny_config(mesh_shape) -> Config:
    return Config(
        model=ModelConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, mem_len=8),
        data=DataConfig(seq_len=8, batch_size=4),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=1),
        train=TrainConfig(steps=10),
        mesh=MeshConfig(shape=mesh_shape))


def run_steps(cfg, devices, n=3):
    setup = state_lib.build(cfg, state_lib.sharding.make_mesh(cfg, devices))
    state = state_lib.init_state(setup, seed=0)
    memory = state_lib.init_memory_sharded(setup, cfg.data.batch_size)
    step = make_train_step(setup)
    losses = []
    for batch in random_batches(cfg, n):
        state, memory, metrics = step(state, memory, state_lib.device_batch(setup, batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), jax.device_get(memory), state


@pytest.mark.slow
def test_sharded_train_step_matches_single_device():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    losses_1, params_1, memory_1, _ = run_steps(tiny_config((1, 1, 1)), jax.devices()[:1])
    losses_8, params_8, memory_8, state_8 = run_steps(tiny_config((2, 2, 2)), jax.devices())
    # The 8-device run really is sharded: a kernel split over fsdp and model.
    qkv = state_8["params"]["layer_0"]["attn"]["qkv"]
    assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params_8, params_1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), memory_8, memory_1)
    assert losses_1[-1] < losses_1[0]


def test_indivisible_sharding_is_a_config_error():
    cfg = tiny_config((2, 2, 2))
    cfg.model.num_heads = 1
    cfg.model.head_dim = 32
    try:
        state_lib.build(cfg)
    except ConfigError as e:
        assert "not divisible" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("heads=1 cannot be split over model=2")


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
    cfg32 = tiny_config((1, 1, 1))
    cfg16 = tiny_config((1, 1, 1))
    cfg16.model.dtype = "bfloat16"
    losses_32, params_32, _, _ = run_steps(cfg32, jax.devices()[:1])
    losses_16, params_16, memory_16, _ = run_steps(cfg16, jax.devices()[:1])
    assert memory_16["xl"]["hidden"].dtype == jax.numpy.bfloat16  # memory stored in the compute dtype
    assert jax.tree.leaves(params_16)[0].dtype == np.float32  # parameters stay float32
    np.testing.assert_allclose(losses_16, losses_32, rtol=2e-2)
    assert losses_16 != losses_32  # it really computed in bfloat16


@pytest.mark.slow
def test_sharded_knn_memory_matches_single_device():
    from memtx.config import KNNConfig

    def with_knn(cfg):
        cfg.model.knn = KNNConfig(enabled=True, layers=(1,), size=12, k=4)  # 3 segments of 8 wrap around
        return cfg

    losses_1, params_1, memory_1, _ = run_steps(with_knn(tiny_config((1, 1, 1))), jax.devices()[:1])
    losses_8, params_8, memory_8, _ = run_steps(with_knn(tiny_config((2, 2, 2))), jax.devices())
    assert memory_8["knn"]["1"]["keys"].shape == (4, 2, 12, 16)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params_8, params_1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), memory_8, memory_1)
