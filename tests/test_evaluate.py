"""Long-document evaluation: row isolation, token accounting, memory length, the CLI."""

import json
import math

import jax
import numpy as np
import pytest

from memtx import evaluate as evaluate_lib
from memtx import evaluation
from memtx import state as state_lib
from memtx.cli import run_cli
from memtx.data import count_tokens, file_source_fn, list_documents
from memtx.data.fingerprint import corpus_fingerprint
from memtx.train import train
from tests.helpers import make_corpus, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    corpus = str(make_corpus(tmp / "corpus"))
    workdir = tmp / "run"
    train(tiny_config(corpus, steps=12, checkpoint_every=12), str(workdir))
    return corpus, workdir


def _evaluate(corpus, batch_size, mem_len=16, params=None):
    cfg = tiny_config(corpus)
    cfg.data.eval_batch_size = cfg.data.batch_size = batch_size
    cfg.model.mem_len = mem_len
    cfg.mesh.shape = (-1, 1, 1) if batch_size % 8 == 0 else (1, 1, 1)
    devices = jax.devices()[: 8 if batch_size % 8 == 0 else 1]
    setup = state_lib.build(cfg, state_lib.sharding.make_mesh(cfg, devices))
    params = state_lib.init_state(setup, seed=0)["params"] if params is None else params
    docs = list_documents(corpus)
    return evaluation.evaluate(setup, params, file_source_fn(docs), verbose=False), docs


@pytest.mark.slow
def test_every_byte_is_scored_once_and_rows_do_not_interact(trained):
    corpus, _ = trained
    one_row, docs = _evaluate(corpus, batch_size=1)
    eight_rows, _ = _evaluate(corpus, batch_size=8)
    assert one_row["tokens"] == eight_rows["tokens"] == count_tokens(docs)
    # Per-row memory with resets at document starts: how documents are packed into rows
    # (1 row streaming them back to back, or 8 rows in parallel on 8 devices) cannot matter.
    assert eight_rows["nll_sum"] == pytest.approx(one_row["nll_sum"], rel=1e-5)
    assert one_row["perplexity"] == pytest.approx(math.exp(one_row["nll_sum"] / one_row["tokens"]))
    assert one_row["bits_per_byte"] == pytest.approx(math.log2(one_row["perplexity"]))
    # Per document: ids in evaluation order, each document's bytes once, sums adding up to the total,
    # and the same NLL per document however documents were packed into rows.
    for result in (one_row, eight_rows):
        per_doc = result["documents_nll"]
        assert per_doc["id"] == list(range(len(docs)))
        assert per_doc["tokens"] == [count_tokens([d]) for d in docs]
        assert sum(per_doc["nll"]) == pytest.approx(result["nll_sum"], rel=1e-5)
        for key in ("loss_by_position", "loss_by_copyability"):
            buckets = result[key].values()
            assert sum(b["tokens"] for b in buckets) == result["tokens"]
            assert sum(b["nll"] * b["tokens"] for b in buckets if b["tokens"]) == pytest.approx(result["nll_sum"], rel=1e-5)
        low, high = result["perplexity_ci95"]
        assert low < result["perplexity"] < high
    np.testing.assert_allclose(eight_rows["documents_nll"]["nll"], one_row["documents_nll"]["nll"], rtol=1e-5)
    # 3000 bytes at most per document: the later position buckets are empty.
    assert one_row["loss_by_position"]["<512"]["tokens"] == 512 * len(docs)
    assert one_row["loss_by_position"][">=8K"] == {"nll": None, "tokens": 0}


def test_memory_length_changes_the_result_but_not_the_accounting(trained):
    corpus, _ = trained
    no_memory, _ = _evaluate(corpus, batch_size=1, mem_len=0)
    long_memory, _ = _evaluate(corpus, batch_size=1, mem_len=48)
    assert no_memory["tokens"] == long_memory["tokens"]
    assert no_memory["nll_sum"] != pytest.approx(long_memory["nll_sum"], rel=1e-6)


@pytest.mark.slow
def test_cli_evaluates_a_checkpoint_with_a_longer_memory(trained, capsys):
    corpus, workdir = trained
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(),
                   ["--workdir", str(workdir), "--split", "train", "--config.model.mem_len=32"])
    assert code == 0
    out = capsys.readouterr().out
    fingerprint = corpus_fingerprint(tiny_config(corpus).data)
    assert "perplexity [95% CI]" in out and "bits/byte" in out and out.count(fingerprint["sha256"]) == 1
    assert "by target position" in out and "local" in out
    path, = workdir.glob(f"eval_train_{fingerprint['sha256'][:8]}_mem32_step12_*.json")
    result = json.loads(path.read_text())
    assert result["overrides"] == ["--config.model.mem_len=32"] and len(result["config_sha256"]) == 12
    assert result["mem_len"] == 32 and result["step"] == 12 and result["corpus"] == fingerprint
    assert result["copyability"] == {"local_window": 16 + 32, "far_reach": 4096, "ngram": 8}
    # Another evaluation that the name does not tell apart (clamped distances) gets its own file.
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(workdir), "--split", "train",
                                                              "--config.model.mem_len=32", "--config.model.clamp_len=4"])
    assert code == 0 and json.loads(path.read_text()) == result
    other, = set(workdir.glob("eval_train_*_mem32_step12_*.json")) - {path}
    clamped = json.loads(other.read_text())
    assert clamped["identity"]["model"]["clamp_len"] == 4 and clamped["nll_sum"] != result["nll_sum"]
    assert np.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 259
    # Training lowered the loss: the trained checkpoint beats random initial parameters.
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    cfg = tiny_config()
    from memtx.config import save_json
    save_json(cfg, str(tmp_path / "config.json"))
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no checkpoint") and err.count("\n") == 1


@pytest.mark.slow
def test_one_checkpoint_evaluated_at_several_knn_memory_sizes(trained, tmp_path, capsys):
    from memtx.config import KNNConfig
    corpus, baseline = trained
    cfg = tiny_config(corpus, steps=4, checkpoint_every=4)
    cfg.model.knn = KNNConfig(enabled=True, layers=(1,), size=32, k=4)
    train(cfg, str(tmp_path / "knn"))
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(baseline), str(tmp_path / "knn"),
                                                              "--split", "train", "--knn-sizes", "0,8,256"])
    out = capsys.readouterr().out
    assert code == 0 and "kNN gate per head, layer 1" in out
    sha = corpus_fingerprint(cfg.data)["sha256"][:8]
    results = {size: json.loads(next((tmp_path / "knn").glob(f"eval_train_{sha}_mem16_knn{size}_step4_*.json")).read_text())
               for size in (0, 8, 256)}
    # Every kNN row is paired with the first work directory's row on the same documents.
    paired = out[out.index("paired with run:"):].splitlines()
    assert paired[0].startswith("paired with run: each row's perplexity minus run's on the same 6 documents")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in paired[3:6]]
    assert [c[:2] for c in cells] == [["knn", str(size)] for size in (0, 8, 256)]
    assert all(c[-1] in ("within noise", "better", "worse") for c in cells)
    # The far reach defaults to the largest kNN size evaluated.
    assert results[0]["copyability"] == {"local_window": 32, "far_reach": 256, "ngram": 8}
    assert len({r["tokens"] for r in results.values()}) == 1
    assert "knn_fill" not in results[0]  # size 0: local attention only
    # A small store is full most of the time; a large one is not.
    assert 0.5 < results[8]["knn_fill"] <= 1.0 and results[256]["knn_fill"] < results[8]["knn_fill"]
    assert -1.0 <= results[256]["knn_top1_score"] and np.isfinite(results[256]["knn_top1_score"])
    assert len({round(r["nll_sum"], 3) for r in results.values()}) == 3  # memory size changes the result
    plot, = (tmp_path / "knn").glob("memory_scaling_train_step4_*.png")
    assert plot.stat().st_size > 1000


def test_cli_corpus_evaluates_every_document_there(trained, tmp_path, capsys):
    """--corpus PATH: every document of PATH (no split), its fingerprint in the JSON; a missing path
    is one line."""
    _, workdir = trained
    other = make_corpus(tmp_path / "other", num_docs=3, max_bytes=800)
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(workdir), "--corpus", str(other)])
    assert code == 0, capsys.readouterr().err
    path = next(p for p in workdir.glob("eval_*.json") if json.loads(p.read_text())["corpus"].get("corpus") == str(other))
    result = json.loads(path.read_text())
    assert result["documents"] == 3
    assert result["tokens"] == sum(len(p.read_bytes()) for p in other.iterdir())
    capsys.readouterr()
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), ["--workdir", str(workdir), "--corpus", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluations_with_different_limits_keep_separate_files(trained, capsys):
    """Provenance: two evaluations of one checkpoint with different document limits write two
    files, each recording its limit, corpus fingerprint and step; repeating one rewrites its own
    file (the same evaluation), never the other's."""
    corpus, workdir = trained
    before = set(workdir.glob("eval_*.json"))
    for limit in (2, 3, 2):
        code = run_cli(evaluate_lib.main, evaluate_lib.parser(),
                       ["--workdir", str(workdir), "--split", "train", f"--config.data.eval_max_docs={limit}"])
        assert code == 0, capsys.readouterr().err
    new = sorted(set(workdir.glob("eval_*.json")) - before)
    assert len(new) == 2
    results = [json.loads(p.read_text()) for p in new]
    assert sorted(r["identity"]["max_docs"] for r in results) == [2, 3]
    assert sorted(r["documents"] for r in results) == [2, 3]
    assert all(r["corpus"]["sha256"] == corpus_fingerprint(tiny_config(corpus).data)["sha256"] and r["step"] == 12
               for r in results)
