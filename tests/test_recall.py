"""The synthetic recall tasks: the byte task's generator (memtx/data/recall.py), and a model that
recalls with its memory on the key-value task (memtx/data/kv_recall.py).

The training test runs `scripts/recall_task.py --skip-baseline` (the key-value task) in a
subprocess on one CPU device, as a user runs it: a one-layer kNN model with smeared keys is
trained for 250 steps (about 20 s), then its accuracy on far answers (beyond the segment; no XL
cache) is compared with the same parameters with the memory emptied, and reading another
document's store, and at a small store by answer distance (the memory-size curve: recall while
the answer is in the store, chance beyond). The full comparison with a separately trained model
without memory is the script's default; its figures are in the README.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memtx.data import recall

ROOT = Path(__file__).resolve().parents[1]


def test_documents_are_deterministic_and_keep_their_promises():
    spec = recall.RecallSpec()
    docs = [recall.make_document(3, i, spec) for i in range(40)]
    assert docs == [recall.make_document(3, i, spec) for i in range(40)]
    assert len(set(docs)) == 40
    far = near = 0
    for text in docs:
        assert len(text) >= spec.length
        recall.check_document(text, spec)  # values repeat; every repeat is near or far
        tokens = recall.value_tokens(text)
        assert tokens and all(chr(t.value) in "0123456789" for t in tokens)
        far += sum(t.distance is not None and t.distance >= spec.gap for t in tokens)
        near += sum(t.distance is not None and t.distance <= spec.near_max for t in tokens)
    assert far > 100 and near > 100  # both kinds are plentiful


def test_check_document_catches_a_changed_value_and_a_mid_distance_repeat():
    spec = recall.RecallSpec(near_max=10, gap=30)
    with pytest.raises(ValueError, match="defined as"):
        recall.check_document(b"#A1; #B2; #A3; ", spec)
    with pytest.raises(ValueError, match="neither near"):
        recall.check_document(b"#A1; " + b"#B2; " * 4 + b"#A1; ", spec)  # 25 bytes back
    recall.check_document(b"#A1; #B2; #A1; " + b"#C3; " * 7 + b"#B2; ", spec)


def test_scoring_counts_only_far_values():
    text = b"#A1; #B2; " + b"x" * 40 + b"#B2; #B2; "  # definitions, a far query, a near one
    assert [t.distance for t in recall.value_tokens(text)] == [None, None, 45, 5]
    tokens = recall.recall_tokens(text, min_distance=32)
    assert [(t.key, chr(t.value), t.offset) for t in tokens] == [(b"B", "2", 52)]
    predicted = np.zeros(len(text), np.int32)
    assert recall.score_predictions(text, predicted, 32) == (0, 1)
    predicted[tokens[0].offset] = ord("2")
    assert recall.score_predictions(text, predicted, 32) == (1, 1)


def test_spec_variants_keep_their_promises():
    """Multi-digit values, fillers from a small lexicon, echoed keys, and far queries spread
    log-uniformly up to far_max: every document still repeats its values and every repeat is near
    or far; the spread reaches beyond 4x the gap."""
    spec = recall.RecallSpec(length=2048, value_len=3, filler_prob=0.5, filler_words=2, lexicon=5, echo_key=True,
                             far_max=1500)
    distances = []
    for i in range(6):
        text = recall.make_document(7, i, spec)
        recall.check_document(text, spec)
        tokens = recall.value_tokens(text)
        assert {t.index for t in tokens} == {0, 1, 2}  # three digits per value, each scored
        assert len(set(w for w in text.split() if w.islower())) <= 5 + 26  # lexicon words and echoed keys
        distances += [t.distance for t in tokens if t.distance is not None and t.index == 0]
    assert max(distances) > 4 * spec.gap and min(distances) <= spec.near_max


def test_accuracy_by_distance_buckets_add_up(monkeypatch):
    """`recall_accuracy(..., buckets=...)` splits the far tokens by distance; with perfect
    predictions every bucket is right, and the buckets' tokens add up to the far total."""
    spec = recall.RecallSpec(length=1024, far_max=900)
    texts = [recall.make_document(11, i, spec) for i in range(4)]
    perfect = [np.frombuffer(t, np.uint8).astype(np.int32) for t in texts]
    monkeypatch.setattr(recall, "predict_documents", lambda setup, params, texts, foreign_store=False: perfect)
    setup = type("Setup", (), {"cfg": type("Cfg", (), {})()})()
    result = recall.recall_accuracy(setup, None, texts, min_distance=32, buckets=(64, 256))
    rows = result["by_distance"]
    assert [(r["min"], r["max"]) for r in rows] == [(32, 64), (64, 256), (256, None)]
    assert sum(r["tokens"] for r in rows) == result["recalled_tokens"] > 0
    assert all(r["tokens"] > 0 and r["accuracy"] == 1.0 for r in rows)
    wrong = [p.copy() for p in perfect]
    for p in wrong:
        p[:] = ord("x")
    monkeypatch.setattr(recall, "predict_documents", lambda setup, params, texts, foreign_store=False: wrong)
    assert all(r["accuracy"] == 0.0 for r in recall.recall_accuracy(setup, None, texts, 32, (64, 256))["by_distance"])


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="gap must exceed"):
        recall.RecallSpec(near_max=40, gap=40)
    with pytest.raises(ValueError, match="far_prob"):
        recall.RecallSpec(far_prob=1.5)
    with pytest.raises(ValueError, match="far_max"):
        recall.RecallSpec(far_max=20)
    with pytest.raises(ValueError, match="invalid recall spec"):
        recall.RecallSpec(value_len=0)


@pytest.mark.slow
def test_a_model_with_knn_memory_recalls_what_it_cannot_see(tmp_path):
    # one CPU device and XLA's optimisations on, as users run it
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "scripts/recall_task.py", "--steps", "250", "--train-docs", "500", "--eval-docs", "32",
           "--skip-baseline", "--workdir", str(tmp_path / "recall"), "--size-curve", "64", "--curve-length", "512"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "recall" / "recall_results.json").read_text())
    assert results["task"] == "kv"
    with_memory, emptied, foreign = results["runs"]
    assert with_memory["model"] == "kNN memory" and emptied["knn_size"] == 0 and foreign["model"].endswith("foreign store")
    assert with_memory["recalled_tokens"] > 600
    chance = results["chance"]  # 1/64
    # Without its memory, or reading another document's, the same model is at chance on far
    # answers; with it, it recalls nearly all (98% in our runs from 200 steps on; 50% at 120).
    assert emptied["accuracy"] < chance + 0.03 and foreign["accuracy"] < chance + 0.03, results
    assert with_memory["accuracy"] > 0.9, results
    # A store of 64 entries on 512-token documents: answers up to 64 tokens back are in it, and
    # those over 96 (64 + the segment) are in no store of that size.
    inside, edge, beyond = results["size_curve"]["sizes"][0]["by_distance"]
    assert (inside["min"], inside["max"], beyond["min"]) == (32, 64, 96)
    assert inside["tokens"] > 200 and beyond["tokens"] > 200, results["size_curve"]
    assert inside["accuracy"] > 0.9 and beyond["accuracy"] < chance + 0.03, results["size_curve"]
    assert (tmp_path / "recall" / "size_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_recall_task_takes_config_overrides_and_prints_its_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "scripts/recall_task.py", "--workdir", str(tmp_path / "r"), "--steps", "50"]
    out = subprocess.run([*cmd, "--config.model.knn.gate_bias_init=3", "--print-config"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads(out.stdout)
    assert cfg["model"]["knn"]["gate_bias_init"] == 3.0 and cfg["train"]["steps"] == 50
    assert not (tmp_path / "r").exists()  # printing generates and trains nothing
    assert cfg["model"]["smeared_keys"] == [0] and cfg["data"]["loss_mask"] == "kv_recall_answers"  # the kv task
    text = subprocess.run([*cmd, "--task", "text", "--print-config"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    cfg = json.loads(text.stdout)
    assert cfg["model"]["num_layers"] == 2 and cfg["model"]["smeared_keys"] == [] and cfg["data"]["loss_mask"] == ""
    bad = subprocess.run([*cmd, "--config.model.nope=1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown config key 'model.nope'" in bad.stderr
