"""The worked example of docs/adding_a_memory.md: examples/top_memory, a memory kind written
outside the package and registered with one call, keeps the contract every shipped kind keeps and
is trained, resumed, evaluated and sized for a device like them, without a change to memtx."""

from __future__ import annotations

import json

import numpy as np
import pytest

from examples.top_memory import KIND
from memtx import evaluate as evaluate_lib
from memtx import fit
from memtx.cli import run_cli
from memtx.config import ConfigError, validate
from memtx.memory import model_memory, registry
from memtx.memory.kind import MemoryLayers, MemoryState
from memtx.train import train
from tests import test_memory_contract as contract
from tests.helpers import make_corpus, tiny_config

NAME = KIND.name


@pytest.fixture
def top_memory():
    """The registry line of the walk-through, undone after the test (the registry is global)."""
    registry.register(KIND)
    try:
        yield KIND
    finally:
        registry.KINDS.pop(NAME)


def test_an_unregistered_kind_is_one_line_naming_the_known_ones():
    cfg = tiny_config()
    cfg.model.memory = NAME
    with pytest.raises(ConfigError, match=f"model.memory' must be one of xl, .*got '{NAME}'"):
        validate(cfg, 1)


def test_the_example_keeps_the_typed_contract_and_is_sized_from_its_init(top_memory):
    assert isinstance(KIND.state, MemoryState) and isinstance(KIND.layers, MemoryLayers)
    cfg = tiny_config()
    cfg.model.memory = NAME
    validate(cfg, 1)
    B, M, D = cfg.data.batch_size, cfg.model.mem_len, cfg.model.d_model
    assert model_memory.state_bytes(cfg.model, B) == B * M * D * 4 + B * 4  # top_BMD float32 + length_B
    assert registry.describe(cfg.model) == f"Top memory memory {M}"


@pytest.mark.slow
@pytest.mark.parametrize("knn", [False, True], ids=["alone", "with_knn"])
def test_the_example_keeps_the_behavioural_contract(top_memory, knn):
    contract.test_a_reset_row_reads_nothing_of_the_previous_document(NAME, knn)
    contract.test_nothing_from_the_future_or_from_other_rows(NAME, knn, pre_norm=False)
    contract.test_padding_is_never_written(NAME, knn)


@pytest.mark.slow
def test_the_example_is_trained_resumed_evaluated_and_fitted(top_memory, tmp_path, capsys):
    contract.test_a_checkpoint_restores_the_state_and_memory_and_training_goes_on_unchanged(NAME, False, tmp_path)
    corpus = str(make_corpus(tmp_path / "corpus", num_docs=4, max_bytes=1500))
    cfg = tiny_config(corpus, steps=6, checkpoint_every=6)
    cfg.model.memory = NAME
    workdir = tmp_path / "run"
    summary = train(cfg, str(workdir))
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert summary["end_step"] == 6 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(workdir), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "Top memory memory 16" in out and "perplexity [95% CI]" in out
    (path,) = workdir.glob("eval_train_*.json")
    assert np.isfinite(json.loads(path.read_text())["perplexity"])
    parts = fit.estimate(cfg, num_devices=1)["parts"]  # one device: the memory's bytes are all of it
    assert parts["memories"] == model_memory.state_bytes(cfg.model, cfg.data.batch_size)
    assert parts[fit.ACTIVATIONS] > 0
