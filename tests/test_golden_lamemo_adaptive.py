"""Cross-check the adaptive input embedding and adaptive softmax (memtx/adaptive.py) inside the
LaMemo model against ../shared/golden/golden_lamemo_adaptive.npz (see its README): the LaMemo
authors' code with cutoffs [20, 35], div_val 2; per segment the scaled input embeddings
`word_emb` [T, B, D], the last layer's `hidden` (refreshed memory rows first) and `nll`.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from memtx.adaptive import AdaptiveIO
from memtx.config import Config, ConfigError, validate
from memtx.model import TransformerLM, init_memory, segment_nll
from tests.golden import golden_path, requires_golden
from tests.test_golden_lamemo import close, model_config, params_from_reference, segment_batch

GOLDEN = golden_path("golden_lamemo_adaptive.npz")
golden_only = requires_golden(GOLDEN)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN, allow_pickle=False))


def adaptive_params_from_reference(g: dict, n_clusters: int) -> dict:
    """Reference AdaptiveEmbedding / ProjectedAdaptiveLogSoftmax weights -> our `adaptive` params.

    The reference ties crit.out_layers.{i}.weight to word_emb.emb_layers.{i}.weight and
    crit.out_projs.{i} to word_emb.emb_projs.{i} for i >= 1; crit.out_projs.0 is its own.
    """
    p = lambda name: jnp.asarray(g[f"param/{name}"])
    params = {"head_proj": p("crit.out_projs.0").T,
              "cluster_weight": p("crit.cluster_weight"), "cluster_bias": p("crit.cluster_bias")}
    for i in range(n_clusters):
        params[f"emb_{i}"] = p(f"word_emb.emb_layers.{i}.weight")
        params[f"emb_proj_{i}"] = p(f"word_emb.emb_projs.{i}").T
        params[f"out_bias_{i}"] = p(f"crit.out_layers.{i}.bias")
        np.testing.assert_array_equal(g[f"param/crit.out_layers.{i}.weight"], g[f"param/word_emb.emb_layers.{i}.weight"])
        if i:
            np.testing.assert_array_equal(g[f"param/crit.out_projs.{i}"], g[f"param/word_emb.emb_projs.{i}"])
    return params


@golden_only
def test_adaptive_lamemo_matches_reference(golden):
    ref = json.loads(str(golden["config_json"]))
    assert ref["tie_projs"] == [False, True, True] and ref["tie_weight"]
    info = ref["scenarios"]["base"]
    M = info["mem_len"]
    cfg = dataclasses.replace(model_config(ref, M), adaptive_cutoffs=tuple(ref["cutoffs"]),
                              adaptive_div_val=ref["div_val"])
    model = TransformerLM(cfg, last_memory_output=True)  # the reference returns its memory rows too
    params = params_from_reference(golden, cfg.num_layers, cfg.num_heads, cfg.dim_per_head)
    del params["embedding"], params["out_bias"]
    params["adaptive"] = adaptive_params_from_reference(golden, len(ref["cutoffs"]) + 1)
    B = golden["data"].shape[1]
    memory = init_memory(cfg, B)
    for s, seg_len in enumerate(info["seg_lens"]):
        at = lambda key: golden[f"base/seg{s}/{key}"]
        where = f"base segment {s}"
        batch = segment_batch(golden, "base", s)
        assert batch["inputs"].shape[1] == seg_len
        emb = AdaptiveIO(cfg).apply({"params": params["adaptive"]}, batch["inputs"], method=AdaptiveIO.embed)
        close(emb, at("word_emb").transpose(1, 0, 2), f"word_emb, {where}")
        nll, memory, inter = segment_nll(model, params, memory, batch, with_intermediates=True)
        close(nll, at("nll").T, f"nll, {where}")
        last = inter[f"layer_{cfg.num_layers - 1}"]
        m_in = at("hidden").shape[0] - seg_len  # the reference's memory length before this segment
        close(last["out"][0], at("hidden")[m_in:].transpose(1, 0, 2), f"hidden, {where}")
        if m_in:
            close(np.asarray(last["out_mem"][0])[:, M - m_in:], at("hidden")[:m_in].transpose(1, 0, 2),
                  f"memory hidden rows, {where}")


def test_adaptive_log_probs_are_normalised():
    import jax
    cfg = dataclasses.replace(Config().model, vocab_size=50, d_model=32, adaptive_cutoffs=(20, 35), adaptive_div_val=2)
    module = AdaptiveIO(cfg)
    h_BND = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32))
    variables = module.init(jax.random.PRNGKey(1), jnp.zeros((2, 3), jnp.int32))
    logp_BNV = module.apply(variables, h_BND, method=AdaptiveIO.log_probs)
    assert logp_BNV.shape == (2, 3, 50) and logp_BNV.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(np.asarray(logp_BNV)).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("cutoffs", [(20, 20), (35, 20), (0, 20), (20, 50), (20, 60)])
def test_bad_cutoffs_raise(cutoffs):
    cfg = Config()
    cfg.model.vocab_size = 50
    cfg.model.adaptive_cutoffs = cutoffs
    with pytest.raises(ConfigError, match="model.adaptive_cutoffs") as e:
        validate(cfg, 1)
    assert "\n" not in str(e.value)


def test_bad_div_val_raises():
    cfg = Config()
    cfg.model.vocab_size = 50
    cfg.model.adaptive_cutoffs = (20, 35)
    cfg.model.adaptive_div_val = 0
    with pytest.raises(ConfigError, match="model.adaptive_div_val"):
        validate(cfg, 1)
    cfg.model.adaptive_cutoffs = (20, 35)
    cfg.model.adaptive_div_val = 2
    validate(cfg, 1)
