"""The output cache (memtx/memory/output_cache.py): its probabilities against a direct NumPy
computation (both scorers, whole cache or top k, with resets, padding and eviction), no future
leakage, lambda 0 giving the model exactly, and the store's size bounding what is seen."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.memory import output_cache
from memtx.memory.output_cache import CacheSpec

B, N, D, V, S = 3, 6, 4, 5, 8  # rows, segment, hidden size, vocabulary, cache entries


def segments(seed=0, count=4):
    """Segments of random h and targets; row 1 starts a new document at segment 2, row 2's first
    document ends (padding) inside segment 1 and the next starts at segment 2."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        valid = np.full(B, N)
        if i == 1:
            valid[2] = 3
        out.append({"h": rng.normal(size=(B, N, D)).astype(np.float32), "targets": rng.integers(0, V, (B, N)),
                    "valid": valid, "reset": np.array([i == 0, i in (0, 2), i in (0, 2)])})
    return out


def run_cache(spec: CacheSpec, segs, nll_model=None):
    """log p_cache(target) and the entries readable, [segment][B, N], through the module's functions."""
    cache = output_cache.init(B, spec.size, spec.key_dim(D))
    logps, ns, mixed = [], [], []
    for i, seg in enumerate(segs):
        cache = output_cache.reset_rows(cache, jnp.asarray(seg["reset"]))
        keys, queries = output_cache.keys_and_queries(jnp.asarray(seg["h"]), spec)
        targets, valid = jnp.asarray(seg["targets"], jnp.int32), jnp.asarray(seg["valid"], jnp.int32)
        scores, tokens, ok, n = output_cache.candidates(cache, queries, keys, targets, valid, spec)
        logp = output_cache.log_prob(scores, tokens, ok, targets, spec.theta)
        logps.append(np.asarray(logp))
        ns.append(np.asarray(n))
        if nll_model is not None:
            mixed.append(np.asarray(output_cache.mixed_nll(jnp.asarray(nll_model[i]), logp, n, spec.lam, spec.fill)))
        cache = output_cache.write(cache, keys, targets, valid)
    return logps, ns, mixed


def reference(spec: CacheSpec, segs):
    """The same, from the definitions: per row, the (h, next token) pairs of the current document,
    the last `size` of the earlier segments plus the earlier positions of this one."""
    logps = [np.full((B, N), -np.inf) for _ in segs]
    ns = [np.zeros((B, N), np.int64) for _ in segs]
    for b in range(B):
        stored = []  # (h, token) of the current document's earlier segments, oldest first
        for i, seg in enumerate(segs):
            if seg["reset"][b]:
                stored = []
            store = stored[-spec.size:]
            for t in range(N):
                entries = store + [(seg["h"][b, j], seg["targets"][b, j]) for j in range(min(t, seg["valid"][b]))]
                ns[i][b, t] = len(entries)
                if not entries:
                    continue
                q = seg["h"][b, t].astype(np.float64)
                hs = np.array([e[0] for e in entries], np.float64)
                toks = np.array([e[1] for e in entries])
                if spec.normalize:
                    q, hs = q / np.linalg.norm(q), hs / np.linalg.norm(hs, axis=1, keepdims=True)
                if spec.scorer == "knn_lm" and not spec.normalize:
                    score = -np.sum((hs - q) ** 2, axis=1) / 2  # -d / T with theta = 2 / T, up to a constant
                else:
                    score = hs @ q
                if spec.k:
                    keep = np.argsort(-score, kind="stable")[:spec.k]
                    score, toks = score[keep], toks[keep]
                p = np.exp(spec.theta * (score - score.max()))
                hit = p[toks == seg["targets"][b, t]].sum() / p.sum()
                logps[i][b, t] = np.log(hit) if hit > 0 else -np.inf
            stored += [(seg["h"][b, j], seg["targets"][b, j]) for j in range(seg["valid"][b])]
    return logps, ns


SPECS = {"continuous": CacheSpec(S, theta=1.5), "continuous_top3": CacheSpec(S, k=3, theta=2.0),
         "continuous_raw": CacheSpec(S, normalize=False, theta=0.7),
         "knn_lm": CacheSpec(S, scorer="knn_lm", k=4, theta=3.0),
         "knn_lm_l2": CacheSpec(S, scorer="knn_lm", k=4, normalize=False, theta=0.5)}


@pytest.mark.parametrize("name", SPECS)
def test_cache_probabilities_equal_the_definition(name):
    spec, segs = SPECS[name], segments()
    got, got_n, _ = run_cache(spec, segs)
    want, want_n = reference(spec, segs)
    for i, seg in enumerate(segs):
        scored = np.arange(N)[None, :] < seg["valid"][:, None]
        np.testing.assert_array_equal(got_n[i][scored], want_n[i][scored])
        finite = np.isfinite(want[i]) & scored
        np.testing.assert_array_equal(np.isfinite(got[i])[scored], finite[scored], err_msg=f"segment {i}")
        np.testing.assert_allclose(got[i][finite], want[i][finite], rtol=1e-4, atol=1e-5, err_msg=f"segment {i}")
    # The cases the reference must exercise: eviction (more than `size` entries written in a
    # document) and targets the cache holds as well as ones it does not.
    assert max(n.max() for n in want_n) > S and any(np.isfinite(w).any() for w in want)
    assert any((~np.isfinite(w) & (n > 0)).any() for w, n in zip(want, want_n))


def test_a_position_never_reads_what_comes_after_it():
    spec, segs = SPECS["continuous"], segments(1)
    base, _, _ = run_cache(spec, segs)
    t = 2  # change every h and target after position t of segment 1, and all of segments 2-3
    changed = [dict(seg) for seg in segs]
    rng = np.random.default_rng(9)
    changed[1] = {**segs[1], "h": segs[1]["h"].copy(), "targets": segs[1]["targets"].copy()}
    changed[1]["h"][:, t + 1:] = rng.normal(size=(B, N - t - 1, D))
    changed[1]["targets"][:, t + 1:] = (segs[1]["targets"][:, t + 1:] + 1) % V
    for i in (2, 3):
        changed[i] = {**segs[i], "h": rng.normal(size=(B, N, D)).astype(np.float32),
                      "targets": (segs[i]["targets"] + 1) % V}
    after, _, _ = run_cache(spec, changed)
    np.testing.assert_array_equal(after[0], base[0])
    np.testing.assert_array_equal(after[1][:, :t + 1], base[1][:, :t + 1])
    assert not np.array_equal(after[2], base[2])  # ... and the change is visible where it may be


def test_lambda_zero_is_the_model_exactly_and_the_mixture_is_a_probability():
    segs = segments(2)
    nll_model = [np.random.default_rng(i).uniform(0.1, 4.0, (B, N)).astype(np.float32) for i in range(len(segs))]
    _, _, mixed = run_cache(CacheSpec(S, lam=0.0), segs, nll_model)
    for m, want in zip(mixed, nll_model):
        np.testing.assert_array_equal(m, want)
    logp, n, mixed = run_cache(CacheSpec(S, lam=0.4, fill=3.0), segs, nll_model)
    for lp, nn, m, want in zip(logp, n, mixed, nll_model):
        w = np.where(nn > 0, 0.4 * nn / (nn + 3.0), 0.0)
        expected = -np.log((1 - w) * np.exp(-want) + w * np.exp(lp))
        np.testing.assert_allclose(m, expected, rtol=1e-5)
    assert (n[0][:, 0] == 0).all()  # a document's first position: nothing cached, the model alone
    np.testing.assert_array_equal(mixed[0][:, 0], nll_model[0][:, 0])


@pytest.mark.parametrize("name", ["continuous", "knn_lm"])
def test_the_whole_distribution_is_normalised_and_scores_the_target_as_evaluation_does(name):
    """log_distribution (what generation samples from) over the whole vocabulary: it sums to 1 and
    at each target equals -mixed_nll (what evaluation scores)."""
    spec = dataclasses.replace(SPECS[name], lam=0.5, fill=2.0)
    rng = np.random.default_rng(4)
    cache = output_cache.init(B, spec.size, spec.key_dim(D))
    for seg in segments(3):
        cache = output_cache.reset_rows(cache, jnp.asarray(seg["reset"]))
        keys, queries = output_cache.keys_and_queries(jnp.asarray(seg["h"]), spec)
        targets, valid = jnp.asarray(seg["targets"], jnp.int32), jnp.asarray(seg["valid"], jnp.int32)
        scores, tokens, ok, n = output_cache.candidates(cache, queries, keys, targets, valid, spec)
        logp_model = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(B, N, V)), jnp.float32))
        dist = output_cache.log_distribution(logp_model, scores, tokens, ok, spec.theta,
                                             output_cache.weight(n, spec.lam, spec.fill))
        np.testing.assert_allclose(np.exp(np.asarray(dist)).sum(-1), 1.0, atol=1e-5)
        nll_model = -jnp.take_along_axis(logp_model, targets[..., None], -1)[..., 0]
        logp = output_cache.log_prob(scores, tokens, ok, targets, spec.theta)
        mixed = output_cache.mixed_nll(nll_model, logp, n, spec.lam, spec.fill)
        at_target = jnp.take_along_axis(dist, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.asarray(at_target), -np.asarray(mixed), rtol=1e-5, atol=1e-5)
        # Where the cache holds something the mixture is not the model (the check is not vacuous).
        assert np.any((np.asarray(n) > 0) & (np.abs(np.asarray(dist - logp_model)).max(-1) > 1e-3))
        cache = output_cache.write(cache, keys, targets, valid)


def test_the_store_size_bounds_what_is_seen():
    """A token written once at a document's start is found while it is within `size` entries of the
    segment, and never once it is older."""
    segs = []
    for i in range(2):
        targets = np.zeros((B, N), np.int64)
        targets[:, 0 if i == 0 else -1] = 3  # the document's only 3, asked for at the end of segment 1
        segs.append({"h": np.ones((B, N, D), np.float32), "targets": targets, "valid": np.full(B, N),
                     "reset": np.array([i == 0] * B)})
    narrow, _, _ = run_cache(CacheSpec(4, theta=1.0), segs)  # 11 entries back: beyond a 4-entry store
    wide, _, _ = run_cache(CacheSpec(5, theta=1.0), segs)  # the store holds segment 0's last 5 of 6
    widest, _, _ = run_cache(CacheSpec(6, theta=1.0), segs)
    assert not np.isfinite(narrow[1][:, -1]).any() and not np.isfinite(wide[1][:, -1]).any()
    np.testing.assert_allclose(np.exp(widest[1][:, -1]), 1 / 11, rtol=1e-5)  # one of 11 equal entries


def test_bad_specs_are_refused():
    for bad, match in ((dict(size=0), "size"), (dict(size=4, scorer="x"), "scorer"),
                       (dict(size=4, scorer="knn_lm"), "k must be"), (dict(size=4, lam=1.0), "lam"),
                       (dict(size=4, theta=float("nan")), "theta"), (dict(size=4, backend="x"), "backend")):
        with pytest.raises(ValueError, match=match):
            CacheSpec(**bad)


def test_the_learned_gate_learns_when_to_trust_the_cache():
    """Tokens where the cache is right (log p_cache high) and ones where it is wrong, told apart
    only by one feature: the fitted gate trusts the cache on the first and not on the second, and
    beats the best single weight; the gate gives an empty cache no weight."""
    from memtx.cache_tuning import train_gate

    rng = np.random.default_rng(0)
    T, F = 4000, 6
    right = rng.random(T) < 0.5
    features = rng.normal(size=(T, 1, F)).astype(np.float32) * 0.1
    features[:, 0, 2] = np.where(right, 1.0, -1.0)
    per_token = {"per_token_features": features, "per_token_n": np.full((T, 1), 50),
                 "per_token_scored": np.ones((T, 1), bool),
                 "per_token_nll_model": np.full((T, 1), 2.0, np.float32),
                 "per_token_logp_cache": np.where(right, np.log(0.9), np.log(1e-4))[:, None].astype(np.float32)}
    fit = train_gate(per_token, lam=0.3)
    gate = np.array(fit["weights"], np.float32)
    w = np.asarray(output_cache.gate_weight(jnp.asarray(features[:, 0]), gate, jnp.full((T,), 50)))
    assert w[right].mean() > 0.8 and w[~right].mean() < 0.1
    lams = np.linspace(0.01, 0.98, 98)[:, None]
    p_model, p_cache = np.exp(-2.0), np.exp(per_token["per_token_logp_cache"][:, 0])
    best_fixed = np.min(np.mean(-np.log((1 - lams) * p_model + lams * p_cache), axis=1))
    assert fit["nll"] < best_fixed - 0.3 and fit["nll"] < fit["nll_at_start"]
    assert float(output_cache.gate_weight(jnp.asarray(features[:1, 0]), gate, jnp.zeros((1,)))[0]) == 0.0
    assert float(w.max()) <= output_cache.GATE_MAX


# ------------------------------------------------------------------ in evaluation, from a checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from memtx.train import train
    from tests.helpers import make_corpus, tiny_config

    tmp = tmp_path_factory.mktemp("cache")
    corpus = str(make_corpus(tmp / "corpus", num_docs=8, max_bytes=2400))
    workdir = tmp / "run"
    train(tiny_config(corpus, steps=6, checkpoint_every=6), str(workdir))
    return corpus, workdir


def evaluate_cli(args, capsys):
    from memtx import evaluate as evaluate_lib
    from memtx.cli import run_cli

    code = run_cli(evaluate_lib.main, evaluate_lib.parser(), [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def results_by_cache(workdir):
    import json
    return {json.loads(p.read_text()).get("cache_size"): json.loads(p.read_text()) for p in workdir.glob("eval_*.json")}


def test_the_cache_is_fitted_on_other_documents_and_paired_with_the_model(trained, capsys):
    import json
    corpus, workdir = trained
    base = ["--workdir", workdir, "--corpus", corpus, "--config.data.eval_max_docs=4"]
    code, out, err = evaluate_cli([*base, "--cache-sizes", "0,32", "--cache-tune-docs", "4"], capsys)
    assert code == 0, err
    results = results_by_cache(workdir)
    plain, cached = results[0], results[32]
    assert cached["cache"]["fit"]["tuned_on"]["documents"] == [4, 8]  # not the reported 0-3
    assert cached["documents_nll"]["id"] == plain["documents_nll"]["id"] and cached["tokens"] == plain["tokens"]
    # The model alone, scored in the cache's pass, is the plain evaluation.
    assert cached["model_perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)
    assert cached["perplexity"] != plain["perplexity"]
    early = cached["first_64_positions"]
    assert early["tokens"] == 4 * 64 and early["nll"] != early["model_nll"]  # 4 documents of over 64 tokens
    assert "run +cache 32" in out and "fitted on" in out and "train documents 4-7" in out
    fit_file, = workdir.glob("cache_fit_continuous_size32_k0_step6_*.json")
    assert json.loads(fit_file.read_text())["spec"]["theta"] == cached["cache"]["theta"]
    assert list(workdir.glob("cache_scaling_train_step6_*.png"))
    # A saved fit reused: the same setting and the same result, without fitting again.
    code, out, err = evaluate_cli([*base, "--cache-sizes", "32", "--cache-fit", fit_file], capsys)
    assert code == 0, err
    assert "fitting the output cache" not in out
    again = results_by_cache(workdir)[32]
    assert again["perplexity"] == pytest.approx(cached["perplexity"], rel=1e-6)
    assert again["cache"]["fit"]["loaded_from"] == str(fit_file)


def test_a_cache_of_weight_zero_is_the_model_exactly(trained):
    """lambda = 0 through the whole evaluation: every document's NLL is the plain step's."""
    from memtx import evaluation
    from memtx import state as state_lib
    from memtx.checkpoint import Checkpointer
    from memtx.data import file_source_fn, list_documents
    from memtx.step import init_cache_memory, make_cache_eval_step
    from tests.helpers import tiny_config

    corpus, workdir = trained
    cfg = tiny_config(corpus, steps=6)
    setup = state_lib.build(cfg)
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    params = ckpt.restore_params(6, setup.abstract_state["params"])
    ckpt.close()
    source_fn = file_source_fn(list_documents(corpus)[:3])
    plain = evaluation.evaluate(setup, params, source_fn, verbose=False)
    spec = CacheSpec(16, lam=0.0, theta=8.0)
    zero = evaluation.evaluate(setup, params, source_fn, verbose=False, step_fn=make_cache_eval_step(setup, spec),
                               init_memory=lambda: init_cache_memory(setup, spec, cfg.data.eval_batch_size))
    np.testing.assert_allclose(zero["documents_nll"]["nll"], plain["documents_nll"]["nll"], rtol=1e-6)
    some = evaluation.evaluate(setup, params, source_fn, verbose=False,
                               step_fn=make_cache_eval_step(setup, CacheSpec(16, lam=0.3, theta=8.0)),
                               init_memory=lambda: init_cache_memory(setup, spec, cfg.data.eval_batch_size))
    assert some["nll_sum"] != plain["nll_sum"]


@pytest.mark.parametrize("args, message", [
    (["--cache-sizes", "32"], "set --config.data.eval_max_docs"),
    (["--cache-sizes", "32", "--config.data.eval_max_docs=6"], "fewer than --cache-tune-docs 32"),
    (["--cache-sizes", "32", "--cache-scorer", "knn_lm", "--cache-k", "0"], "k must be"),
    (["--cache-fit", "x.json"], "--cache-fit needs --cache-sizes"),
    (["--cache-sizes", "32", "--cache-mixtures", "fill,nope"], "--cache-mixtures 'fill,nope'"),
    (["--cache-sizes", "32", "--config.data.eval_max_docs=2", "--cache-fit", "nope.json"], "not a cache fit"),
])
def test_bad_cache_options_are_one_line_errors(trained, capsys, args, message):
    corpus, workdir = trained
    code, _, err = evaluate_cli(["--workdir", workdir, "--corpus", corpus, *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
