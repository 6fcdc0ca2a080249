"""The Compressive Transformer: its state against a slow list-based reference, where its
gradients go, and that without compressed slots it is Transformer-XL."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import ModelConfig
from memtx.memory.compressive import CompressiveConfig
from memtx.memory.compressive import state as compressive
from memtx.memory.compressive.layers import Compressor
from memtx.model import TransformerLM, init_memory, segment_nll


def _reference(segments, num_valids, resets, M, C, rate):
    """Per row: a FIFO list of the last M vectors and a list of the last C compressed ones. A
    write's evicted vectors are cut into groups of `rate` from their newest end (the oldest group
    may be short) and each group is averaged."""
    B = segments[0].shape[0]
    fifo, comp = [[] for _ in range(B)], [[] for _ in range(B)]
    for seg, n_B, reset_B in zip(segments, num_valids, resets):
        for b in range(B):
            if reset_B[b]:
                fifo[b], comp[b] = [], []
            fifo[b] = fifo[b] + [seg[b, i] for i in range(n_B[b])]
            evicted, fifo[b] = fifo[b][: max(len(fifo[b]) - M, 0)], fifo[b][max(len(fifo[b]) - M, 0):]
            groups = []
            while evicted:
                groups.insert(0, np.mean(evicted[-rate:], axis=0))
                evicted = evicted[:-rate]
            comp[b] = (comp[b] + groups)[-C:] if C else []
    return fifo, comp


@pytest.mark.parametrize("M, C, rate", [(4, 3, 2), (6, 5, 3), (2, 4, 2), (0, 3, 2)])
def test_state_matches_a_list_reference(M, C, rate):
    """Several segments of 6 positions with random valid prefixes and resets, one layer, D = 2;
    mean-pooling. The valid slots of both memories equal the reference's lists, oldest first."""
    B, N, D = 3, 6, 2
    rng = np.random.default_rng(M * 10 + C)
    cfg = ModelConfig(d_model=D, num_layers=1, mem_len=M, memory="compressive",
                      compressive=CompressiveConfig(size=C, rate=rate, function="mean"))
    compress = Compressor(cfg)
    state = compressive.init(1, B, M, C, D)
    segments, num_valids, resets = [], [], []
    for step in range(7):
        seg = rng.standard_normal((B, N, D)).astype(np.float32)
        n_B = rng.choice([N, N, N, 4, 1, 0], size=B) if step else np.full(B, N)
        reset_B = rng.random(B) < 0.2 if step else np.ones(B, bool)
        segments.append(seg), num_valids.append(n_B), resets.append(reset_B)
        state = compressive.reset_rows(state, jnp.asarray(reset_B))
        block, valid = compressive.evicted(state, jnp.asarray(seg)[None], jnp.asarray(n_B, jnp.int32))
        groups, num_groups = compress.apply({}, block, valid)
        state = compressive.write(state, jnp.asarray(seg)[None], groups, num_groups, jnp.asarray(n_B, jnp.int32))
    fifo, comp = _reference(segments, num_valids, resets, M, C, rate)
    mask = np.asarray(compressive.valid_mask(state))
    for b in range(B):
        kept_comp = np.asarray(state["compressed"][0, b])[mask[b, :C]]
        kept_fifo = np.asarray(state["hidden"][0, b])[mask[b, C:]]
        np.testing.assert_allclose(kept_fifo, np.reshape(fifo[b], (-1, D)), atol=1e-6)
        np.testing.assert_allclose(kept_comp, np.reshape(comp[b], (-1, D)), atol=1e-6)


def _model(function="conv", size=4, pre_norm=False):
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32, mem_len=6,
                      memory="compressive", pre_norm=pre_norm,
                      compressive=CompressiveConfig(size=size, rate=2, function=function))
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                        jnp.full((2,), 6, jnp.int32))["params"]
    return cfg, model, nn.meta.unbox(params)


def _batch(tokens, reset):
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens + 1) % 40, "weights": jnp.ones(tokens.shape),
            "reset": jnp.asarray(reset)}


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.slow
def test_the_reconstruction_loss_trains_the_compressor_alone(pre_norm):
    """Its gradient reaches the compression network only; the language-model loss's reaches
    everything else and not the compression network (compressed slots are state)."""
    cfg, model, params = _model(pre_norm=pre_norm)
    rng = np.random.default_rng(0)
    memory = init_memory(cfg, 2)
    for s in range(2):  # fill the memory so that the third segment evicts and reads compressed slots
        _, memory = segment_nll(model, params, memory, _batch(rng.integers(0, 40, (2, 6)), [s == 0] * 2))
    batch = _batch(rng.integers(0, 40, (2, 6)), [False, False])
    aux_grads = jax.jit(jax.grad(lambda p: segment_nll(model, p, memory, batch, with_aux_loss=True)[2]))(params)
    lm_grads = jax.jit(jax.grad(lambda p: jnp.sum(segment_nll(model, p, memory, batch)[0])))(params)
    norms = lambda tree: {k: float(optax_norm(v)) for k, v in tree.items()}  # noqa: E731
    aux, lm = norms(aux_grads), norms(lm_grads)
    assert aux.pop("compressor") > 0 and all(v == 0 for v in aux.values()), aux
    assert lm.pop("compressor") == 0 and all(v > 0 for k, v in lm.items() if k.startswith("layer_")), lm


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_the_loss_is_zero_until_something_is_evicted_and_then_positive():
    cfg, model, params = _model()
    rng = np.random.default_rng(1)
    memory = init_memory(cfg, 2)
    losses = []
    for s in range(3):
        _, memory, aux = segment_nll(model, params, memory, _batch(rng.integers(0, 40, (2, 6)), [s == 0] * 2),
                                     with_aux_loss=True)
        losses.append(float(aux))
    assert losses[0] == 0 and losses[1] > 0  # M = 6: the second segment evicts the first


def test_without_compressed_slots_it_is_transformer_xl():
    """Size 0: no compression network, the parameters and every logit of Transformer-XL's (one
    case: at size 0 no compression function is built, so conv and mean were the same test)."""
    cfg, model, params = _model(size=0)
    xl_cfg = dataclasses.replace(cfg, memory="xl", compressive=CompressiveConfig())
    xl_model = TransformerLM(xl_cfg)
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.meta.unbox(xl_model.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(xl_cfg, 2),
                                    jnp.full((2,), 6, jnp.int32))["params"]))
    rng = np.random.default_rng(2)
    memory, xl_memory = init_memory(cfg, 2), init_memory(xl_cfg, 2)
    for s in range(4):
        batch = _batch(rng.integers(0, 40, (2, 6)), [s == 0] * 2)
        nll, memory = segment_nll(model, params, memory, batch)
        xl_nll, xl_memory = segment_nll(xl_model, params, xl_memory, batch)
        np.testing.assert_allclose(nll, xl_nll, atol=1e-6)


def test_compressed_slots_change_what_the_model_predicts():
    cfg, model, params = _model()
    xl_cfg = dataclasses.replace(cfg, memory="xl", compressive=CompressiveConfig())
    rng = np.random.default_rng(3)
    memory, xl_memory = init_memory(cfg, 2), init_memory(xl_cfg, 2)
    xl_params = {k: v for k, v in params.items() if k != "compressor"}
    for s in range(3):
        batch = _batch(rng.integers(0, 40, (2, 6)), [s == 0] * 2)
        nll, memory = segment_nll(model, params, memory, batch)
        xl_nll, xl_memory = segment_nll(TransformerLM(xl_cfg), xl_params, xl_memory, batch)
    assert int(memory["compressive"]["compressed_length"][0]) == 4  # 2 x 6 evicted at rate 2: the newest 4 of 6
    assert not np.allclose(nll, xl_nll, atol=1e-4)


def _numpy_attention(h_BND, rows_BMD, valid_BM, qkv_D3HE, norm=None, eps=1e-5):
    """Content attention of h over `rows` alone, as the module docstring defines it: softmax of
    q.k / sqrt(Dh) over the valid rows (a query with none reads zeros); pre-LN normalises both."""
    def layer_norm(x, scale, bias):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * scale + bias
    if norm is not None:
        h_BND, rows_BMD = layer_norm(h_BND, *norm), layer_norm(rows_BMD, *norm)
    q = np.einsum("bnd,dhe->bnhe", h_BND, qkv_D3HE[:, 0])
    k = np.einsum("bmd,dhe->bmhe", rows_BMD, qkv_D3HE[:, 1])
    v = np.einsum("bmd,dhe->bmhe", rows_BMD, qkv_D3HE[:, 2])
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        keep = np.flatnonzero(valid_BM[b])
        if not len(keep):
            continue
        scores = np.einsum("nhe,mhe->hnm", q[b], k[b, keep]) / np.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[b] = np.einsum("hnm,mhe->nhe", probs, v[b, keep])
    return out


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
def test_the_reconstruction_loss_equals_its_definition(pre_norm):
    """L_attn against a direct NumPy computation of the definition: per layer, the squared
    difference of the layer's content attention over the evicted rows and over their compressed
    groups, summed over heads and features, averaged over the valid query positions of rows that
    evicted something (row 2 evicted nothing; row 1 has 3 valid positions of 5), summed over
    layers. Its value is not small, so a dropped term or layer would show."""
    from memtx.memory.compressive.layers import reconstruction_loss
    L, B, N, D, H, E, c = 2, 3, 5, 8, 2, 4, 2
    cfg = ModelConfig(num_layers=L, d_model=D, num_heads=H, d_ff=16, mem_len=4, pre_norm=pre_norm, memory="compressive",
                      compressive=CompressiveConfig(size=3, rate=c))
    rng = np.random.default_rng(7)
    params = {f"layer_{l}": {"attn": {"qkv": rng.standard_normal((D, 3, H, E))},
                             "attn_norm": {"scale": 1 + 0.1 * rng.standard_normal(D), "bias": 0.1 * rng.standard_normal(D)}}
              for l in range(L)}
    inputs = rng.standard_normal((L, B, N, D))
    old = rng.standard_normal((L, B, 4, D))  # the evicted slots
    old_valid = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    groups = rng.standard_normal((L, B, 2, D))
    num_groups, num_valid = np.array([2, 1, 0]), np.array([5, 3, 5])
    groups_valid = np.arange(2)[None, :] >= 2 - num_groups[:, None]  # the newest num_groups slots
    weight = (np.arange(N)[None, :] < num_valid[:, None]) & old_valid.any(-1)[:, None]
    expected = 0.0
    for l in range(L):
        p = params[f"layer_{l}"]
        norm = (p["attn_norm"]["scale"], p["attn_norm"]["bias"]) if pre_norm else None
        target = _numpy_attention(inputs[l], old[l], old_valid, p["attn"]["qkv"], norm, cfg.layer_norm_eps)
        rebuilt = _numpy_attention(inputs[l], groups[l], groups_valid, p["attn"]["qkv"], norm, cfg.layer_norm_eps)
        error = np.square(target - rebuilt).sum((2, 3))
        expected += (error * weight).sum() / (weight.sum() * H * E)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = reconstruction_loss(cfg, jax.tree.map(f32, params), f32(inputs), jnp.asarray(num_valid), f32(old),
                              jnp.asarray(old_valid), f32(groups), jnp.asarray(num_groups))
    assert expected > 0.1
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)
