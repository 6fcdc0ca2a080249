"""Training loop behaviour: non-finite losses, resuming under a different config, outputs."""

import json
import math

import jax
import numpy as np
import pytest

from memtx import state as state_lib
from memtx.checkpoint import Checkpointer
from memtx.config import ConfigError
from memtx.train import NonFiniteLoss, train
from tests.helpers import make_corpus, tiny_config


@pytest.mark.slow
def test_non_finite_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    cfg = tiny_config(corpus, steps=10, checkpoint_every=1)
    cfg.optim.learning_rate, cfg.optim.warmup_steps = 1e38, 3  # step 1 has lr 0, then it overflows
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="at step 2; kept the last good checkpoint \\(step 1\\)"):
        train(cfg, str(workdir))
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    assert ckpt.all_steps() == [1]
    params = ckpt.restore_params(1, state_lib.build(cfg).abstract_state["params"])
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    logged = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1]


@pytest.mark.slow
def test_resuming_with_another_model_is_a_one_line_error(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    train(tiny_config(corpus, steps=3, checkpoint_every=3), str(tmp_path / "run"))
    other = tiny_config(corpus, steps=4)
    other.model.d_model = 64
    with pytest.raises(ConfigError, match="model.d_model: 32 -> 64") as info:
        train(other, str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    # Changing only the length of the run is fine: it continues from step 3.
    summary = train(tiny_config(corpus, steps=5, checkpoint_every=5), str(tmp_path / "run"))
    assert (summary["start_step"], summary["end_step"]) == (3, 5)


def test_run_writes_config_metrics_and_tensorboard_events(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    workdir = tmp_path / "run"
    train(tiny_config(corpus, steps=3, checkpoint_every=3), str(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["corpus"] == corpus and saved["train"]["steps"] == 3
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["tokens"] > 0 and m["grad_norm"] > 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
