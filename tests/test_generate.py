"""Generation (memtx/generate.py) against the teacher-forced forward.

For each memory kind (Transformer-XL cache, kNN store, LaMemo), greedy decoding's per-token logits
must equal those of the segment-by-segment forward that training and evaluation run over the same
text (1e-5 in float32): across segment boundaries, and for a second document whose memory row is
reset after the first. Also: sampling's options, and the command line on a trained run.
"""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.cache_tuning import save_fit
from memtx.config import Config, DataConfig, KNNConfig, ModelConfig
from memtx.memory.block_recurrent import BlockRecurrentConfig
from memtx.memory.compressive import CompressiveConfig
from memtx.generate import Generator, generate, sample
from memtx.memory import model_memory, output_cache, registry
from memtx.memory.output_cache import CacheSpec
from memtx.model import TransformerLM, init_memory

ROOT = Path(__file__).resolve().parents[1]
V, BOS, PAD, N = 40, 38, 39, 6

KINDS = {
    "xl": dict(mem_len=5),
    "knn": dict(mem_len=4, knn=KNNConfig(enabled=True, layers=(1,), size=16, k=4, gate_bias_init=1.0)),
    "lamemo": dict(mem_len=5, memory="lamemo"),
    "rpe": dict(mem_len=0),
    # smeared keys in both layers (a cached row's key mixes in the previous row's unsmeared key),
    # the memory layer without position terms, its attention scale starting at 1 (meliad's options)
    "knn_smeared": dict(mem_len=4, knn=KNNConfig(enabled=True, layers=(1,), size=16, k=4, gate_bias_init=1.0,
                                                 position_terms=False),
                        smeared_keys=(0, 1), qk_scale_init=1.0),
    "xl_prenorm_qknorm": dict(mem_len=5, pre_norm=True, qk_norm=True),
    # both layers as one scan: the cache goes through it stacked
    "xl_scanned": dict(mem_len=5, scan_layers=True),
    # M < N: every segment also passes positions the FIFO cannot keep to the compressed memory
    "compressive": dict(mem_len=2, memory="compressive", compressive=CompressiveConfig(size=4, rate=2)),
    # 2 blocks per segment: the second reads the state the first wrote
    "block_recurrent": dict(mem_len=2, memory="block_recurrent",
                            block_recurrent=BlockRecurrentConfig(block_len=3, state_size=3, layer=-1)),
}


def setup(kind):
    cfg = Config(model=ModelConfig(vocab_size=V, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2,
                                   d_ff=32, **KINDS[kind]),
                 data=DataConfig(seq_len=N))
    model = TransformerLM(cfg.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, N), jnp.int32), init_memory(cfg.model, 1),
                        jnp.zeros((1,), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    # Larger than the init: logits that differ clearly from token to token (a real test of equality).
    params = jax.tree.unflatten(tree, [p + 0.5 * jax.random.normal(jax.random.key(i), p.shape)
                                       for i, p in enumerate(leaves)])
    return cfg, model, params


def teacher_forced_logits(cfg, model, params, documents):
    """Logits [len(doc), V] of each document read as in evaluation: BOS + tokens, segments of N,
    one memory carried across documents and reset at each document's first segment."""
    memory = init_memory(cfg.model, 1)
    out = []
    for doc in documents:
        inputs = np.array([BOS, *doc], np.int32)
        rows = []
        for s in range(0, len(inputs), N):
            seg = inputs[s:s + N]
            padded = np.full((1, N), PAD, np.int32)
            padded[0, :len(seg)] = seg
            memory = model_memory.reset_rows(memory, jnp.array([s == 0]))
            logits, memory = model.apply({"params": params}, jnp.asarray(padded), memory,
                                         jnp.array([len(seg)], jnp.int32))
            rows.append(np.asarray(logits[0, :len(seg)]))
        out.append(np.concatenate(rows))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_greedy_logits_equal_the_teacher_forced_forward(kind):
    cfg, model, params = setup(kind)
    gen = Generator(cfg, params, PAD)
    rng = np.random.default_rng(0)
    documents, all_logits = [], []
    # BOS + prompt + continuation: 18 inputs, 3 full segments. (A document's last, shorter segment
    # is a different computation for LaMemo, whose look-ahead window is the segment's length; the
    # generator treats the segment being written as full, as the continued text will have it.)
    for prompt_len, new in ((5, 12), (8, 9)):
        prompt = list(rng.integers(0, 30, prompt_len))
        tokens, logits = generate(gen, prompt, new, BOS, rng, greedy=True, allowed=30)
        assert len(tokens) == new
        documents.append(prompt + tokens)
        all_logits.append((prompt_len, tokens, logits))
    reference = teacher_forced_logits(cfg, model, params, documents)
    for (prompt_len, tokens, logits), ref in zip(all_logits, reference):
        # The logits at input position prompt_len + j (BOS first) drew generated token j.
        ref_gen = ref[prompt_len:prompt_len + len(tokens)]
        np.testing.assert_allclose(np.stack(logits), ref_gen, rtol=1e-5, atol=1e-5)
        assert tokens == [int(np.argmax(r[:30])) for r in ref_gen]
    # The two documents' continuations are not trivially alike (the check above can fail).
    assert all_logits[0][1] != all_logits[1][1][:len(all_logits[0][1])]
    if not registry.of(cfg.model).kv_cache:  # LaMemo, Block-Recurrent: a whole-segment forward per token
        assert gen.decodes == 0
    else:  # most tokens went through the key/value cache, not a whole-segment forward
        assert gen.decodes >= 10 and gen.forwards < gen.decodes


def teacher_forced_mixed(cfg, model, params, documents, spec):
    """Log-probabilities [len(doc) + 1, V] of the model mixed with the output cache, read as
    evaluation reads each document (BOS + tokens in whole segments; the store written after each
    segment is scored, reset at each document) through output_cache's functions."""
    memory = init_memory(cfg.model, 1)
    out = []
    for doc in documents:
        inputs, targets = np.array([BOS, *doc], np.int32), np.array([*doc, PAD], np.int32)
        assert len(inputs) % N == 0  # whole segments (LaMemo's last, shorter one is another computation)
        store = output_cache.init(1, spec.size, spec.key_dim(cfg.model.d_model))
        rows = []
        for s in range(0, len(inputs), N):
            memory = model_memory.reset_rows(memory, jnp.array([s == 0]))
            (logits, memory), state = model.apply({"params": params}, jnp.asarray(inputs[None, s:s + N]), memory,
                                                  jnp.array([N], jnp.int32), mutable=["intermediates"])
            keys, queries = output_cache.keys_and_queries(state["intermediates"]["output_hidden"][0], spec)
            seg_targets, num_valid = jnp.asarray(targets[None, s:s + N]), jnp.array([N], jnp.int32)
            scores, tokens, valid, n = output_cache.candidates(store, queries, keys, seg_targets, num_valid, spec)
            h = state["intermediates"]["output_hidden"][0]
            logp = output_cache.log_distribution(jax.nn.log_softmax(logits), scores, tokens, valid, spec.theta,
                                                 output_cache.mixture_weight(spec, n, h, scores, valid))
            rows.append(np.asarray(logp[0]))
            store = output_cache.write(store, keys, seg_targets, num_valid)
        out.append(np.concatenate(rows))
    return out


@pytest.mark.parametrize("kind, spec", [
    ("xl", CacheSpec(size=8, theta=4.0, lam=0.5, fill=2.0)),  # 17 pairs per document: the store evicts
    ("knn", CacheSpec(size=32, scorer="knn_lm", k=3, normalize=False, theta=0.5, lam=0.6)),
    # a whole-segment forward per token, and a learned gate (16 + 2 features and a bias): the
    # weight read from h and the candidates
    ("lamemo", CacheSpec(size=8, theta=8.0, gate=tuple(float(g) for g in np.random.default_rng(5).normal(size=19)))),
])
@pytest.mark.slow
def test_generation_with_the_output_cache_equals_the_teacher_forced_mixture(kind, spec):
    cfg, model, params = setup(kind)
    gen = Generator(cfg, params, PAD, cache=spec)
    rng = np.random.default_rng(0)
    documents, drawn = [], []
    for prompt_len, new in ((5, 12), (8, 9)):  # two documents: the second's store starts empty
        prompt = list(rng.integers(0, 30, prompt_len))
        tokens, logits = generate(gen, prompt, new, BOS, rng, greedy=True, allowed=30)
        documents.append(prompt + tokens)
        drawn.append((prompt_len, tokens, np.stack(logits)))
    mixed = teacher_forced_mixed(cfg, model, params, documents, spec)
    plain = teacher_forced_logits(cfg, model, params, documents)
    for (prompt_len, tokens, logits), ref, model_only in zip(drawn, mixed, plain):
        ref = ref[prompt_len:prompt_len + len(tokens)]
        np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.exp(ref).sum(-1), 1.0, atol=1e-5)  # a distribution over the vocabulary
        assert tokens == [int(np.argmax(r[:30])) for r in ref]
        # The cache changes what is drawn from (the check above compares two real mixtures).
        model_logp = jax.nn.log_softmax(model_only[prompt_len:prompt_len + len(tokens)])
        assert np.max(np.abs(np.asarray(model_logp) - ref)) > 0.1


def test_the_second_document_does_not_see_the_first():
    """After start_document the memory row is reset: a document's logits do not depend on what
    the generator read before it."""
    cfg, model, params = setup("knn")
    fresh, used = Generator(cfg, params, PAD), Generator(cfg, params, PAD)
    rng = np.random.default_rng(1)
    generate(used, list(rng.integers(0, 30, 20)), 5, BOS, rng, greedy=True)  # fills store and cache
    prompt = list(rng.integers(0, 30, 9))
    a = generate(fresh, prompt, 6, BOS, np.random.default_rng(2), greedy=True)[1]
    b = generate(used, prompt, 6, BOS, np.random.default_rng(2), greedy=True)[1]
    np.testing.assert_allclose(np.stack(a), np.stack(b), rtol=1e-5, atol=1e-5)


def test_sampling_options():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert sample(logits, rng, greedy=True) == 0 and sample(logits, rng, temperature=0) == 0
    assert {sample(logits, rng, top_k=2) for _ in range(200)} == {0, 1}
    assert {sample(logits, rng, top_p=0.7) for _ in range(200)} == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert {sample(logits, rng, top_p=0.5) for _ in range(50)} == {0}
    assert {sample(logits, rng, allowed=3, banned=[0]) for _ in range(200)} == {1, 2}
    draws = [sample(logits, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    counts = np.bincount([sample(logits, rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    hot = np.bincount([sample(logits, rng, temperature=5.0) for _ in range(4000)], minlength=4) / 4000
    assert hot[3] > 0.15  # a high temperature flattens the distribution


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-m", "memtx.generate", *args], cwd=cwd, env=env,
                         capture_output=True, timeout=600)  # stdout: bytes (a barely trained model writes any)
    out.stderr = out.stderr.decode()
    return out


@pytest.mark.slow
def test_command_line_continues_a_prompt_from_a_trained_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text("abcabcabc " * 40)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    overrides = [f"--config.data.corpus={corpus}", "--config.data.split_fractions=1,0,0", "--config.train.steps=4", "--config.optim.warmup_steps=1",
                 "--config.data.batch_size=2", "--config.model.num_layers=2", "--config.model.d_model=32",
                 "--config.model.d_ff=64", "--config.model.mem_len=8", "--config.data.seq_len=16",
                 "--config.train.checkpoint_every=4", "--config.model.knn.size=64", "--config.model.knn.k=8"]
    train = subprocess.run([sys.executable, "-m", "memtx.train", "--config", str(ROOT / "configs/knn.py:cpu"),
                            "--workdir", str(tmp_path / "run"), *overrides], env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    out = run_cli("--workdir", str(tmp_path / "run"), "--prompt", "abcab" * 10, "--max-tokens", "40",
                  "--seed", "3", "--top-k", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "40 tokens generated" in out.stderr and "tokens/s" in out.stderr
    assert 0 < len(out.stdout) <= 40  # one byte per token (the final newline goes to stderr)
    again = run_cli("--workdir", str(tmp_path / "run"), "--prompt", "abcab" * 10, "--max-tokens", "40",
                    "--seed", "3", "--top-k", "5", cwd=tmp_path)
    assert again.stdout == out.stdout  # the seed fixes the sample
    # With the output cache (a fit as memtx.evaluate saves it): drawn from the mixture.
    fit = tmp_path / "fit.json"
    save_fit(str(fit), CacheSpec(size=64, theta=16.0, lam=0.9), {"theta": 16.0, "lam": 0.9, "fill": 0.0}, {})
    cached = run_cli("--workdir", str(tmp_path / "run"), "--prompt", "abcab" * 10, "--max-tokens", "40",
                     "--seed", "3", "--top-k", "5", "--cache-fit", str(fit), "--cache-size", "32", cwd=tmp_path)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert "output cache continuous 32 (theta 16, lambda 0.9, fill 0)" in cached.stderr
    assert "40 tokens generated" in cached.stderr and cached.stdout != out.stdout
    # Bad flags (no prompt, --top-p 0, ...) are one-line errors: tests/test_hostile_inputs.py, in-process.
