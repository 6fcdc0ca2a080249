"""`data.loss_mask`: the training loss on some targets only (the batch's `loss_weights`), while
every valid token is still read and written to memory."""

import jax
import numpy as np
import pytest

from helpers import random_batches, tiny_config
from memtx import state as state_lib
from memtx.config import ConfigError, KNNConfig, validate
from memtx.model import segment_nll
from memtx.step import make_train_step


@pytest.mark.slow
def test_the_train_step_averages_the_loss_over_the_masked_targets_and_writes_every_token():
    cfg = tiny_config()
    cfg.model.knn = KNNConfig(enabled=True, layers=(1,), size=32, k=4)
    setup = state_lib.build(cfg)
    step = make_train_step(setup)
    batch = next(random_batches(cfg, 1))
    mask = (np.random.default_rng(1).random(batch["weights"].shape) < 0.3).astype(np.float32) * batch["weights"]
    params = jax.device_get(state_lib.init_state(setup, seed=0)["params"])
    nll_BN, _ = segment_nll(setup.model, params, state_lib.init_memory_sharded(setup, 4), batch)
    runs = {}
    for name, loss_weights in (("masked", mask), ("every token", batch["weights"])):
        state, memory = state_lib.init_state(setup, seed=0), state_lib.init_memory_sharded(setup, 4)
        state, memory, metrics = step(state, memory, state_lib.device_batch(setup, {**batch, "loss_weights": loss_weights}))
        runs[name] = (metrics, jax.device_get(memory))
        expected = float(np.sum(np.asarray(nll_BN) * loss_weights) / loss_weights.sum())
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        assert float(metrics["tokens"]) == batch["weights"].sum()  # tokens read, whatever the mask
    # A batch without loss_weights trains on every valid token.
    state, memory = state_lib.init_state(setup, seed=0), state_lib.init_memory_sharded(setup, 4)
    _, _, metrics = step(state, memory, state_lib.device_batch(setup, batch))
    assert float(metrics["loss"]) == float(runs["every token"][0]["loss"])
    # The mask changes the loss and its gradient (the first step's update is 0: warm-up), not
    # what the memories hold.
    for key in ("loss", "grad_norm"):
        assert abs(float(runs["masked"][0][key]) - float(runs["every token"][0][key])) > 1e-4, key
    jax.tree.map(np.testing.assert_array_equal, runs["masked"][1], runs["every token"][1])


def test_an_unknown_loss_mask_is_a_one_line_error():
    cfg = tiny_config()
    cfg.data.loss_mask = "answers"
    with pytest.raises(ConfigError, match="data.loss_mask.*kv_recall_answers") as info:
        validate(cfg, 8)
    assert "\n" not in str(info.value)
