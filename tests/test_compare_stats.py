"""memtx.stats: bootstrap intervals over documents, paired differences, seed statistics."""

import math

import numpy as np
import pytest

from memtx import stats


def _documents(n, seed=0, mean=1.5):
    rng = np.random.default_rng(seed)
    tokens_D = rng.integers(200, 5000, n)
    return tokens_D * rng.normal(mean, 0.2, n), tokens_D


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_documents():
    widths = []
    for n in (20, 2000):
        nll_D, tokens_D = _documents(n)
        low, high = stats.bootstrap_perplexity(nll_D, tokens_D)
        assert low < stats.perplexity(nll_D, tokens_D) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # ~ 1/sqrt(documents): 10x narrower
    assert stats.bootstrap_perplexity(*_documents(20), seed=3) != stats.bootstrap_perplexity(*_documents(20), seed=4)
    assert stats.bootstrap_perplexity(*_documents(20), seed=3) == stats.bootstrap_perplexity(*_documents(20), seed=3)


def test_a_run_paired_with_itself_differs_by_exactly_zero():
    nll_D, tokens_D = _documents(50)
    d = stats.paired_difference(nll_D, nll_D, tokens_D)
    assert d["diff"] == 0.0 and tuple(d["diff_ci"]) == (0.0, 0.0) and tuple(d["rel_pct_ci"]) == (0.0, 0.0)
    assert d["verdict"] == "within noise"


def test_a_clearly_shifted_run_is_better_or_worse_and_pairing_beats_noise():
    nll_D, tokens_D = _documents(50)
    worse = stats.paired_difference(nll_D, nll_D + 0.01 * tokens_D, tokens_D)
    better = stats.paired_difference(nll_D, nll_D - 0.01 * tokens_D, tokens_D)
    assert worse["verdict"] == "worse" and worse["diff_ci"][0] > 0 and worse["rel_pct"] == pytest.approx(
        100 * (math.exp(0.01) - 1))
    assert better["verdict"] == "better" and better["diff_ci"][1] < 0
    # The same 1% shift is far inside the unpaired intervals of the two runs: only pairing sees it.
    low, high = stats.bootstrap_perplexity(nll_D, tokens_D)
    assert low < worse["b"] < high
    # Noise alone (documents up or down at random, no shift on average) reads "within noise".
    rng = np.random.default_rng(1)
    noisy = stats.paired_difference(nll_D, nll_D + rng.normal(0, 0.05, 50) * tokens_D, tokens_D)
    assert noisy["diff_ci"][0] < 0 < noisy["diff_ci"][1] and noisy["verdict"] == "within noise"


def test_verdict_wording():
    assert stats.verdict(-0.2, 0.1) == "within noise"
    assert stats.verdict(0.0, 0.3) == "within noise"
    assert stats.verdict(-0.3, -0.1) == "better"
    assert stats.verdict(0.1, 0.3) == "worse"


def test_seed_t_interval_against_a_hand_computed_value():
    s = stats.seed_summary([1.0, 2.0, 6.0])
    # mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7); t(0.975, df=2) = 4.302653
    half = 4.302652729749464 * math.sqrt(7) / math.sqrt(3)
    assert s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(7))
    assert s["ci"] == pytest.approx((3 - half, 3 + half))
    assert stats.seed_summary([4.2]) == {"n": 1, "mean": 4.2, "std": None, "ci": None}


def test_t_quantiles_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 45, 200, 10_000):
        assert stats.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-5)


def test_paired_seed_differences():
    a = [4.40, 4.52, 4.47]
    same_shift = stats.paired_seed_difference(a, [x - 0.05 for x in a])
    assert same_shift["mean"] == pytest.approx(-0.05) and same_shift["std"] == pytest.approx(0, abs=1e-12)
    assert same_shift["verdict"] == "better"
    mixed = stats.paired_seed_difference(a, [4.45, 4.48, 4.47])
    assert mixed["ci"][0] < 0 < mixed["ci"][1] and mixed["verdict"] == "within noise"
    assert stats.paired_seed_difference([1.0], [1.5])["verdict"] == "within noise"  # one seed: no interval
    with pytest.raises(ValueError):
        stats.paired_seed_difference([1.0, 2.0], [1.0])
