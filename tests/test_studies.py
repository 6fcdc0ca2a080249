"""The LaMemo paper's studies (memtx/studies): extrapolation, alpha, attention over distance."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx import evaluate as evaluate_lib
from memtx import evaluation
from memtx import state as state_lib
from memtx.checkpoint import Checkpointer
from memtx.cli import run_cli
from memtx.config import load_json, save_json
from memtx.data import file_source_fn, list_documents, split_documents
from memtx.studies import alpha, attention_distance, common, extrapolation
from memtx.train import train
from tests.helpers import make_corpus, tiny_config

N = M = 16  # tiny_config: segment 16, memory 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Transformer-XL and a LaMemo run of the same tiny size, a few steps each."""
    tmp = tmp_path_factory.mktemp("studies")
    corpus = str(make_corpus(tmp / "corpus", num_docs=3))
    workdirs = {}
    for memory in ("xl", "lamemo"):
        cfg = tiny_config(corpus, steps=3, checkpoint_every=3)
        cfg.model.memory = memory
        train(cfg, str(tmp / memory))
        workdirs[memory] = str(tmp / memory)
    return workdirs


def _cli(module, argv, out):
    return run_cli(module.main, module.parser(), [*argv, "--split", "train", "--out", str(out)])


def _output(out, stem, ext):
    """OUT/STEM_HASH.EXT, the one study output of that name."""
    paths = sorted(out.glob(f"{stem}_*.{ext}"))
    assert len(paths) == 1, paths
    return paths[0]


def _restore(workdir, cfg=None):
    cfg = load_json(os.path.join(workdir, "config.json")) if cfg is None else cfg
    setup = state_lib.build(cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    return setup, ckpt.restore_params(ckpt.latest_step(), setup.abstract_state["params"])


@pytest.mark.slow
def test_extrapolation_at_one_segment_is_the_evaluation_perplexity(runs, tmp_path, capsys):
    code = _cli(extrapolation, ["--workdir", runs["lamemo"], "--multiples", "2,1", "--config.data.eval_max_docs=1"], tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and "| m | memory M |" in out
    result = json.loads(_output(tmp_path, "extrapolation_train", "json").read_text())
    assert _output(tmp_path, "extrapolation_train", "png").stat().st_size > 1000
    assert result["multiples"] == [1, 2]
    points = result["runs"]["lamemo"]["points"]
    assert [p["mem_len"] for p in points] == [N, 2 * N]
    setup, params = _restore(runs["lamemo"])
    cfg = setup.cfg
    docs = split_documents(list_documents(cfg.data.corpus), "train", cfg.data.split_fractions)[:1]
    expected = evaluation.evaluate(setup, params, file_source_fn(docs), verbose=False)
    assert points[0]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert points[0]["tokens"] == points[1]["tokens"] == expected["tokens"]
    # A longer memory is a different computation on documents longer than two segments.
    assert points[0]["perplexity"] != points[1]["perplexity"]
    # Provenance: what was evaluated is recorded, and a rerun over other documents keeps its own files.
    prov = result["provenance"]["runs"]["lamemo"]
    assert (prov["step"], prov["max_docs"], prov["split"]) == (3, 1, "train") and prov["corpus"]["documents"] == 3
    assert _cli(extrapolation, ["--workdir", runs["lamemo"], "--multiples", "1", "--config.data.eval_max_docs=2"],
                tmp_path) == 0
    outputs = sorted(tmp_path.glob("extrapolation_train_*.json"))
    assert len(outputs) == 2 and len(list(tmp_path.glob("extrapolation_train_*.png"))) == 2
    limits = sorted(json.loads(p.read_text())["provenance"]["runs"]["lamemo"]["max_docs"] for p in outputs)
    assert limits == [1, 2]


@pytest.mark.slow
def test_extrapolation_with_the_output_cache(runs, tmp_path, capsys):
    """--cache-fit: every M also with the cache; weight 0 is the model's own perplexity exactly,
    a real weight another, and the table and plot say so."""
    from memtx.cache_tuning import save_fit
    from memtx.memory.output_cache import CacheSpec

    for lam in (0.0, 0.5):
        fit = tmp_path / f"fit{lam}.json"
        save_fit(str(fit), CacheSpec(size=32, theta=8.0, lam=lam), {"theta": 8.0, "lam": lam, "fill": 0.0}, {})
        out = tmp_path / f"out{lam}"
        code = _cli(extrapolation, ["--workdir", runs["xl"], "--multiples", "1", "--config.data.eval_max_docs=1",
                                    "--cache-fit", str(fit)], out)
        assert code == 0 and "xl +cache" in capsys.readouterr().out
        point, = json.loads(_output(out, "extrapolation_train", "json").read_text())["runs"]["xl"]["points"]
        if lam == 0.0:
            assert point["cache_perplexity"] == pytest.approx(point["perplexity"], rel=1e-6)
        else:
            assert point["cache_perplexity"] != pytest.approx(point["perplexity"], rel=1e-3)
        assert _output(out, "extrapolation_train", "png").stat().st_size > 1000


def test_alpha_curves_per_layer_over_memory_slots(runs, tmp_path, capsys):
    code = _cli(alpha, ["--workdir", runs["xl"], runs["lamemo"], "--config.data.eval_max_docs=2"], tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and "xl: its memory is not refreshed by look-ahead" in out and "newest slot" in out
    assert _output(tmp_path, "alpha_train", "png").stat().st_size > 1000
    result = json.loads(_output(tmp_path, "alpha_train", "json").read_text())
    assert list(result["runs"]) == ["lamemo"]
    alpha_LM = np.array(result["runs"]["lamemo"]["alpha_LM"], float)
    assert alpha_LM.shape == (2, M) and np.all((alpha_LM >= 0) & (alpha_LM <= 1))
    # With M = N every slot is refreshed once: the newest looks ahead at one key, the oldest at N,
    # while their carried denominators came from attending over about as many keys.
    assert np.all(alpha_LM[:, -1] > alpha_LM[:, 0])


def test_alpha_counts_valid_slots_and_follows_the_carried_denominator(runs):
    setup, params = _restore(runs["lamemo"])
    step_fn = common.make_segment_step(setup, alpha.alpha_reduce(setup.cfg.model))
    memory = state_lib.init_memory_sharded(setup, 4)
    state = memory["lamemo"]
    big = jnp.stack([jnp.full(state["logS"].shape[1:], 40.0), jnp.full(state["logS"].shape[1:], -40.0)])
    state = {**state, "logS": jax.device_put(big, state["logS"].sharding),
             "length": jax.device_put(jnp.array([M, M // 2, 0, M], jnp.int32), state["length"].sharding)}
    inputs = np.arange(4 * N, dtype=np.int32).reshape(4, N) % 200 + 32
    weights = np.ones((4, N), np.float32)
    weights[3] = 0  # a row without tokens: not counted
    batch = {"inputs": inputs, "targets": inputs, "weights": weights, "reset": np.array([False, False, False, False])}
    _, sums = step_fn(params, {**memory, "lamemo": state}, state_lib.device_batch(setup, batch))
    H = setup.cfg.model.num_heads
    expected_count_M = H * (1 + (np.arange(M) >= M // 2))  # row 0: all slots; row 1: the newest half
    np.testing.assert_array_equal(np.asarray(sums["count_M"]), expected_count_M)
    alpha_LM = np.asarray(sums["alpha_LM"]) / expected_count_M
    np.testing.assert_allclose(alpha_LM[0], 1.0, atol=1e-5)  # logS huge: the memory keeps its C
    np.testing.assert_allclose(alpha_LM[1], 0.0, atol=1e-5)  # logS tiny: the look-ahead replaces it


def test_distance_sums_match_a_loop():
    rng = np.random.default_rng(0)
    L, B, H, N_, M_ = 2, 3, 2, 4, 3
    K = M_ + N_
    key_valid_BK = np.concatenate([np.arange(M_)[None] >= M_ - np.array([[3], [1], [0]]), np.ones((B, N_), bool)], 1)
    scored_BN = np.arange(N_)[None] < np.array([[4], [2], [0]])
    key_NK = np.arange(K)[None] <= M_ + np.arange(N_)[:, None]
    visible_BNK = key_NK[None] & key_valid_BK[:, None]
    logits = np.where(visible_BNK[None, :, None], rng.normal(size=(L, B, H, N_, K)), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sums = jax.tree.map(np.asarray, attention_distance.distance_sums(
        jnp.asarray(probs), jnp.asarray(scored_BN), jnp.asarray(key_valid_BK)))
    mass_LD, visible_D, memory_L = np.zeros((L, K)), np.zeros(K), np.zeros(L)
    for b, h, i, j in np.ndindex(B, H, N_, K):
        if scored_BN[b, i] and j <= M_ + i:
            mass_LD[:, M_ + i - j] += probs[:, b, h, i, j]
            visible_D[M_ + i - j] += key_valid_BK[b, j]
            memory_L += probs[:, b, h, i, j] * (j < M_)
    np.testing.assert_allclose(sums["mass_LD"], mass_LD, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums["visible_D"], visible_D)
    np.testing.assert_allclose(sums["memory_L"], memory_L, rtol=1e-5, atol=1e-6)
    assert sums["queries"] == scored_BN.sum() * H
    np.testing.assert_allclose(sums["mass_LD"].sum(-1), sums["queries"], rtol=1e-5)


@pytest.mark.slow
def test_attention_distance_mass_over_distances(runs, tmp_path, capsys):
    code = _cli(attention_distance, ["--workdir", runs["xl"], runs["lamemo"], "--config.data.eval_max_docs=2"], tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and "mass on memory" in out
    assert _output(tmp_path, "attention_distance_train", "png").stat().st_size > 1000
    result = json.loads(_output(tmp_path, "attention_distance_train", "json").read_text())
    for run in result["runs"].values():
        mass_LD = np.array(run["mass_LD"], float)
        visible_D = np.array(run["visible_fraction_D"], float)
        assert mass_LD.shape == (2, M + N)
        np.testing.assert_allclose(mass_LD.sum(-1), 1.0, rtol=1e-5)  # every query's probabilities
        assert np.all(mass_LD[:, visible_D == 0] == 0) and np.all(mass_LD <= visible_D + 1e-6)
        assert visible_D[0] == pytest.approx(1.0) and visible_D[-1] < 1  # only the last query sees d = K-1
        memory_L = np.array(run["memory_fraction_L"])
        assert np.all((memory_L > 0) & (memory_L < 1))
        # Keys beyond distance N - 1 are all memory keys.
        assert np.all(mass_LD[:, N:].sum(-1) <= memory_L + 1e-6)

    # The same Transformer-XL checkpoint without memory: nothing beyond the segment, no memory mass.
    code = _cli(attention_distance, ["--workdir", runs["xl"], "--config.data.eval_max_docs=2", "--config.model.mem_len=0"],
                tmp_path / "no_memory")
    assert code == 0
    run = json.loads(_output(tmp_path / "no_memory", "attention_distance_train", "json").read_text())["runs"]["xl"]
    assert run["mem_len"] == 0 and len(run["mass_D"]) == N and run["memory_fraction_L"] == [0.0, 0.0]


@pytest.mark.parametrize("module", [extrapolation, alpha, attention_distance])
def test_bad_inputs_are_one_line_errors(module, runs, tmp_path, capsys):
    assert _cli(module, ["--workdir", str(tmp_path / "missing")], tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: work directory") and err.count("\n") == 1
    save_json(tiny_config(), str(tmp_path / "config.json"))
    assert _cli(module, ["--workdir", runs["lamemo"], str(tmp_path)], tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint") and err.count("\n") == 1
    assert not list(tmp_path.glob(f"{module.__name__.rsplit('.', 1)[1]}_train*.json"))


def test_alpha_needs_a_lamemo_run_and_modules_run_as_commands(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "memtx.studies.alpha", "--workdir", runs["xl"], "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: the alpha study needs a LaMemo run")
    assert run_cli(extrapolation.main, extrapolation.parser(), ["--workdir", runs["xl"], "--multiples", "1,x"]) == 2


def test_a_lamemo_checkpoint_evaluates_with_a_part_switched_off_and_a_mismatch_is_one_line(runs, capsys):
    # Ablating at evaluation: the saved look-ahead bias is skipped, everything else restored.
    cfg = load_json(os.path.join(runs["lamemo"], "config.json"))
    full_setup, full = _restore(runs["lamemo"], cfg)
    cfg.model.lamemo.look_ahead = False
    _, ablated = _restore(runs["lamemo"], cfg)
    assert "v_minus_bias" in full and "v_minus_bias" not in ablated
    np.testing.assert_array_equal(ablated["layer_0"]["attn"]["q"], full["layer_0"]["attn"]["q"])
    # A Transformer-XL checkpoint read as LaMemo lacks LaMemo's parameters: one line, exit code 2.
    code = run_cli(evaluate_lib.main, evaluate_lib.parser(),
                   ["--workdir", runs["xl"], "--split", "train", "--config.model.memory=lamemo"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "has no parameter" in err


@pytest.mark.parametrize("worst, scale", [(27.0, "log"), (9.0, "linear")])
def test_extrapolation_plot_handles_a_run_that_blows_up(tmp_path, monkeypatch, worst, scale):
    """One run over 3x worse than the best point: the perplexity axis is logarithmic (and the plot
    is still written); within 3x it stays linear."""
    from memtx.studies import common
    plt = common.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    runs = {name: {"memory": name, "trained_mem_len": 64, "clamp_len": 0,
                   "points": [{"multiple": m, "perplexity": p} for m, p in zip((1, 2), values)]}
            for name, values in (("xl", (4.3, 4.3)), ("lamemo", (4.5, worst)))}
    path = tmp_path / "extrapolation.png"
    assert extrapolation.plot({"split": "validation", "runs": runs}, str(path))
    assert path.stat().st_size > 0
    assert [fig.axes[0].get_yscale() for fig in figures] == [scale]
