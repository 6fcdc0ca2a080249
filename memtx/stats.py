"""Separating signal from noise in comparisons (pure numpy).

Two sources of noise, two tools:
- which documents were evaluated: a bootstrap over documents (resampled with replacement) of the
  corpus perplexity exp(sum NLL / sum tokens), and of the paired difference of two runs on the
  same documents (the same resample for both runs);
- which initialisation a run drew: mean, standard deviation and a t-interval over seeds, and the
  paired difference of two configs seed by seed (trained on the same batches).

Lower is better for every quantity here (perplexity, loss): a difference B - A whose 95% interval
lies below 0 reads "better", above 0 "worse", and one that covers 0 "within noise".
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df)).
_T975 = (12.706204736174698, 4.302652729749464, 3.182446305284263, 2.7764451051977934, 2.570581835636314,
         2.4469118511449666, 2.3646242515927853, 2.306004135204166, 2.2621571628540993, 2.2281388519649385,
         2.200985160082949, 2.1788128296634177, 2.1603686564610127, 2.1447866879169273, 2.131449545559323,
         2.1199052992210112, 2.1098155778331806, 2.10092204024096, 2.093024054408263, 2.0859634472658364,
         2.0796138447276626, 2.0738730679040147, 2.0686576104190406, 2.0638985616280205, 2.059538552753294,
         2.055529438642871, 2.0518305164802833, 2.048407141795244, 2.045229642132703, 2.0422724563012373)


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (a 95% two-sided interval): tabulated up to 30 degrees of freedom,
    then the Cornish-Fisher expansion around the normal quantile (error < 1e-5)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def verdict(low: float, high: float) -> str:
    """"within noise" when [low, high] (an interval of B - A) covers 0; else "better" (B lower) or "worse"."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0.0 <= high:
        return "within noise"
    return "better" if high < 0 else "worse"


def perplexity(nll_D, tokens_D) -> float:
    """Corpus perplexity exp(sum NLL / sum tokens) of documents' NLL sums and token counts."""
    return math.exp(float(np.sum(nll_D)) / max(float(np.sum(tokens_D)), 1.0))


def _resampled_sums(values_KD: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, K]: the sums over D documents drawn with replacement of each row of `values_KD`
    (the same draw for every row: paired), in chunks that keep memory bounded."""
    K, D = values_KD.shape
    rng = np.random.default_rng(seed)
    out_RK = np.empty((resamples, K))
    chunk = max(1, 4_000_000 // max(D, 1))
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        counts_nD = np.stack([np.bincount(rng.integers(0, D, D), minlength=D) for _ in range(n)])
        out_RK[start:start + n] = counts_nD @ values_KD.T
    return out_RK


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _documents(nll_D, tokens_D) -> tuple[np.ndarray, np.ndarray]:
    nll_D, tokens_D = np.asarray(nll_D, np.float64), np.asarray(tokens_D, np.float64)
    if nll_D.ndim != 1 or nll_D.shape != tokens_D.shape or not len(nll_D):
        raise ValueError(f"per-document NLL sums {nll_D.shape} and token counts {tokens_D.shape} must be two "
                         "equally long, non-empty lists")
    return nll_D, tokens_D


def bootstrap_perplexity(nll_D, tokens_D, *, resamples: int = RESAMPLES, seed: int = 0,
                         level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the corpus perplexity over documents."""
    nll_D, tokens_D = _documents(nll_D, tokens_D)
    sums_R2 = _resampled_sums(np.stack([nll_D, tokens_D]), resamples, seed)
    return _interval(np.exp(sums_R2[:, 0] / np.maximum(sums_R2[:, 1], 1.0)), level)


def paired_difference(nll_a_D, nll_b_D, tokens_a_D, tokens_b_D=None, *, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Run B against run A on the same documents (index d is the same document in both): the
    difference of corpus perplexities B - A, and B / A - 1 in %, each with a bootstrap interval from
    resampling documents jointly for both runs, and the verdict of the difference."""
    nll_a_D, tokens_a_D = _documents(nll_a_D, tokens_a_D)
    nll_b_D, tokens_b_D = _documents(nll_b_D, tokens_a_D if tokens_b_D is None else tokens_b_D)
    if len(nll_a_D) != len(nll_b_D):
        raise ValueError(f"paired runs need the same documents: {len(nll_a_D)} against {len(nll_b_D)}")
    sums_R4 = _resampled_sums(np.stack([nll_a_D, tokens_a_D, nll_b_D, tokens_b_D]), resamples, seed)
    ppl_a_R = np.exp(sums_R4[:, 0] / np.maximum(sums_R4[:, 1], 1.0))
    ppl_b_R = np.exp(sums_R4[:, 2] / np.maximum(sums_R4[:, 3], 1.0))
    a, b = perplexity(nll_a_D, tokens_a_D), perplexity(nll_b_D, tokens_b_D)
    diff_ci = _interval(ppl_b_R - ppl_a_R, level)
    return {"a": a, "b": b, "diff": b - a, "diff_ci": diff_ci, "rel_pct": 100 * (b / a - 1),
            "rel_pct_ci": _interval(100 * (ppl_b_R / ppl_a_R - 1), level), "documents": len(nll_a_D),
            "resamples": resamples, "level": level, "verdict": verdict(*diff_ci)}


def seed_summary(values_S) -> dict:
    """Mean, standard deviation (ddof=1) and the 95% t-interval of the mean of per-seed values
    (std and interval None for a single seed)."""
    x = np.asarray(values_S, np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError("seed statistics need a non-empty list of values")
    mean = float(x.mean())
    if len(x) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci": None}
    std = float(x.std(ddof=1))
    half = t_quantile_975(len(x) - 1) * std / math.sqrt(len(x))
    return {"n": len(x), "mean": mean, "std": std, "ci": (mean - half, mean + half)}


def paired_seed_difference(a_S, b_S) -> dict:
    """Config B minus config A seed by seed (seed s of both trained on the same batches): the
    seed statistics of the differences and their verdict ("within noise" with a single seed)."""
    a_S, b_S = np.asarray(a_S, np.float64), np.asarray(b_S, np.float64)
    if a_S.shape != b_S.shape:
        raise ValueError(f"paired seeds need the same seeds in both configs: {len(a_S)} against {len(b_S)}")
    summary = seed_summary(b_S - a_S)
    summary["verdict"] = verdict(*summary["ci"]) if summary["ci"] else "within noise"
    return summary
