"""Validation while training (train.eval_every / train.eval_max_docs) and what a run writes for
TensorBoard: eval lines in metrics.jsonl that equal memtx.evaluate on the same checkpoint,
throughput, step time, each kNN head's gate and the store's fill, the resolved config."""

import json
import math

import pytest

from memtx.config import ConfigError, KNNConfig, validate
from memtx.evaluation import evaluate_workdir
from memtx.train import train
from tests.helpers import make_corpus, tiny_config


def knn_config(corpus, **train):
    cfg = tiny_config(corpus, **train)
    cfg.data.split_fractions = (60, 40, 0)
    cfg.model.knn = KNNConfig(enabled=True, layers=(1,), size=64, k=4)
    return cfg


@pytest.mark.slow
def test_validation_during_training_equals_memtx_evaluate(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus", num_docs=8))
    workdir = tmp_path / "run"
    cfg = knn_config(corpus, steps=6, log_every=2, checkpoint_every=6, eval_every=3, eval_max_docs=2)
    train(cfg, str(workdir))
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval_perplexity" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert all(m["eval_documents"] == 2 and m["eval_tokens"] > 0 and math.isfinite(m["eval_perplexity"])
               and m["eval_perplexity_lo"] <= m["eval_perplexity"] <= m["eval_perplexity_hi"] for m in evals)
    assert evals[0]["eval_perplexity"] != evals[1]["eval_perplexity"]  # the parameters moved
    # The same documents, scored by memtx.evaluate from the step-6 checkpoint: the same number.
    eval_cfg = knn_config(corpus, steps=6)
    eval_cfg.data.eval_max_docs = 2
    row, = evaluate_workdir(str(workdir), eval_cfg, step=6, reuse=False)
    assert row["tokens"] == evals[1]["eval_tokens"]
    assert row["perplexity"] == pytest.approx(evals[1]["eval_perplexity"], rel=1e-5)
    # Training lines (every one with a loss) carry throughput, step time, gates and fill.
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4, 5, 6]
    logged = {m["step"]: m for m in train_lines}
    for s in (4, 6):  # after the first window (which includes compilation)
        assert logged[s]["tokens_per_s"] > 0 and logged[s]["step_time_s"] > 0
    assert all(0 < logged[6][f"knn_gate_l1_h{h}"] < 1 for h in range(2))
    assert 0 < logged[6]["knn_fill_l1"] <= 1
    assert logged[6]["tokens_seen"] == 6 * cfg.data.batch_size * cfg.data.seq_len
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # the viewer is optional (the accelerator image lacks it): the event files are checked above
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"eval/perplexity", "train/loss", "train/tokens_per_s", "train/knn_gate_l1_h0"} <= set(tags["scalars"])
    assert any("config" in t for t in tags["tensors"])
    assert [e.step for e in acc.Scalars("eval/perplexity")] == [3, 6]


def test_bad_validation_settings_are_one_line_errors(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    for key, value in (("eval_every", -1), ("eval_max_docs", -2)):
        cfg = tiny_config(corpus, **{key: value})
        with pytest.raises(ConfigError, match=f"train.{key}") as info:
            validate(cfg, 1)
        assert "\n" not in str(info.value)
    cfg = tiny_config(corpus, steps=3, eval_every=1)  # split 1,0,0: no validation documents
    from memtx.data import CorpusError
    with pytest.raises(CorpusError, match=r"split 'validation' of corpus .* has no documents") as info:
        train(cfg, str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    # Found before the first step, not at the first evaluation: nothing trained, nothing saved.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
