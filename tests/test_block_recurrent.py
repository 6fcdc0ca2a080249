"""The Block-Recurrent Transformer (memtx/memory/block_recurrent/layers.py): one block's state update
against a NumPy reference written from the paper's equations, the state as the only path between
blocks when there is no window, the gradient it carries inside a segment, and the presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import ConfigError, load_config_file, to_dict, validate
from memtx.memory.block_recurrent import BlockRecurrentConfig
from memtx.model import init_memory, segment_nll
from tests.helpers import segment_batch, small_model

ROOT = Path(__file__).resolve().parents[1]


def _model(**options):
    mem_len = options.pop("mem_len", 0)
    return small_model(mem_len=mem_len, memory="block_recurrent",
                       block_recurrent=BlockRecurrentConfig(**{"block_len": 2, "state_size": 3, "layer": 0, **options}))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _attend(q, k, v, mask=None):
    """q [B, S, H, E], k/v [B, K, H, E]: softmax(q.k / sqrt(E)) v."""
    scores = np.einsum("bshe,bkhe->bhsk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhsk,bkhe->bshe", probs, v)


def _gate(p, c, h, kind):
    if kind == "fixed":
        g = _sigmoid(p["gate_bias"])
        return c * g + (h @ p["z"] + p["z_bias"]) * (1 - g)
    z, i, f = (h @ p["kernel"][:, j] + p["bias"][j] for j in range(3))
    return c * _sigmoid(f + 1) + np.tanh(z) * _sigmoid(i - 1)


def reference_state_update(cfg, params, tokens, valid):
    """The state after one block whose recurrent layer is layer 0 (post-LN, no window): its
    input is the scaled embedding of `tokens`."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layer = p["layer_0"]
    x = p["embedding"][tokens] * np.sqrt(cfg.d_model)  # [B, W, D]
    k = np.einsum("bwd,dhe->bwhe", x, layer["attn"]["qkv"][:, 1])
    v = np.einsum("bwd,dhe->bwhe", x, layer["attn"]["qkv"][:, 2])
    c = np.broadcast_to(layer["initial_state"], (tokens.shape[0], *layer["initial_state"].shape))
    s = _layer_norm(c, layer["state_norm"]) + layer["state_position"]
    q_self, q_cross, k_s, v_s = (np.einsum("bsd,dhe->bshe", s, layer["state_qkv"][:, j]) for j in range(4))
    h = (np.einsum("bshe,hed->bsd", _attend(q_self, k_s, v_s), layer["state_out"][0])
         + np.einsum("bshe,hed->bsd", _attend(q_cross, k, v, valid), layer["state_out"][1]))
    kind = cfg.block_recurrent.gate
    c = _gate(layer["gate_attn"], c, h, kind)
    if not cfg.block_recurrent.skip_ffn:
        f = layer["state_ffn"]
        m = np.maximum(_layer_norm(c, layer["state_ffn_norm"]) @ f["wi"] + f["bi"], 0) @ f["wo"] + f["bo"]
        c = _gate(layer["gate_ffn"], c, m, kind)
    return c


@pytest.mark.parametrize("gate, skip_ffn", [("fixed", False), ("lstm", False), ("fixed", True)])
@pytest.mark.slow
def test_one_block_updates_the_state_as_the_numpy_reference(gate, skip_ffn):
    cfg, model, params = _model(gate=gate, skip_ffn=skip_ffn)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, (2, 2))
    weights = np.array([[1, 1], [1, 0]], np.float32)  # row 1: one valid position, one of padding
    _, memory = segment_nll(model, params, init_memory(cfg, 2), segment_batch(tokens, [True, True], weights))
    state = memory["block_recurrent"]
    expected = reference_state_update(cfg, params, tokens, weights > 0)
    np.testing.assert_allclose(np.asarray(state["state"]), expected, rtol=2e-4, atol=2e-4)
    assert np.asarray(state["blocks"]).tolist() == [1, 1]
    assert ("state_ffn" in params["layer_0"]) == (not skip_ffn)


def test_without_a_window_the_state_is_the_only_path_between_blocks():
    """mem_len 0: a block attends over itself only, so what an earlier block (of this segment or
    of the last one) changes reaches later blocks through the recurrent state alone."""
    cfg, model, params = _model(layer=-1)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 40, (2, 6)), rng.integers(0, 40, (2, 6))
    changed = first.copy()
    changed[0, :2] = (changed[0, :2] + 5) % 40  # row 0, block 0
    memory = init_memory(cfg, 2)
    (a, mem_a), (b, mem_b) = (segment_nll(model, params, memory, segment_batch(t, [True, True])) for t in (first, changed))
    a, b = np.asarray(a), np.asarray(b)
    assert not np.allclose(a[0, 2:], b[0, 2:], atol=1e-5)  # blocks 1 and 2 of row 0 read the changed state
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)  # row 1 is untouched
    (next_a, _), (next_b, _) = (segment_nll(model, params, m, segment_batch(second, [False, False]))
                                for m in (mem_a, mem_b))
    assert not np.allclose(np.asarray(next_a)[0, :2], np.asarray(next_b)[0, :2], atol=1e-5)  # the next segment too
    # A reset reads the initial state again: the previous document no longer matters.
    (reset_a, _), (reset_b, _) = (segment_nll(model, params, m, segment_batch(second, [True, True]))
                                  for m in (mem_a, mem_b))
    np.testing.assert_allclose(np.asarray(reset_a), np.asarray(reset_b), atol=1e-6)


@pytest.mark.slow
def test_the_state_update_learns_from_the_blocks_after_it_in_the_segment():
    """The gradient reaches the state-update parameters only through later blocks of the same
    segment (the state is constant between segments): several blocks per segment train them, one
    block per segment cannot."""
    tokens = np.random.default_rng(2).integers(0, 40, (2, 6))

    def gate_gradient(block_len):
        cfg, model, params = _model(block_len=block_len, layer=-1)

        def loss(params):
            nll, _ = segment_nll(model, params, init_memory(cfg, 2), segment_batch(tokens, [True, True]))
            return nll.mean()

        grads = jax.jit(jax.grad(loss))(params)["layer_1"]
        return float(jnp.abs(grads["gate_attn"]["z"]).sum() + jnp.abs(grads["gate_ffn"]["z"]).sum())

    assert gate_gradient(2) > 1e-4
    assert gate_gradient(6) == 0.0


def test_a_segment_not_a_multiple_of_the_block_is_padded_inside():
    """A shorter segment (evaluation's last, or a test's) gives the logits of the same tokens in
    a full segment whose other positions are padding."""
    cfg, model, params = _model(layer=-1, mem_len=2)
    tokens = np.random.default_rng(3).integers(0, 40, (2, 6))
    weights = np.ones((2, 6), np.float32)
    weights[:, 5:] = 0
    full, mem_full = segment_nll(model, params, init_memory(cfg, 2), segment_batch(tokens, [True, True], weights))
    short, mem_short = segment_nll(model, params, init_memory(cfg, 2), segment_batch(tokens[:, :5], [True, True]))
    np.testing.assert_allclose(np.asarray(full)[:, :5], np.asarray(short), atol=1e-5)
    for x, y in zip(jax.tree.leaves(mem_full), jax.tree.leaves(mem_short)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("preset", ["cpu", "cpu_lstm", "pg19"])
def test_presets(preset):
    cfg = load_config_file(f"{ROOT / 'configs' / 'block_recurrent.py'}:{preset}")
    validate(cfg, 8)
    b = cfg.model.block_recurrent
    assert cfg.model.memory == "block_recurrent" and cfg.data.seq_len % b.block_len == 0
    assert cfg.data.seq_len // b.block_len >= 2  # the state is trained inside segments
    if preset.startswith("cpu"):  # the txl cpu model with blocks and a state: nothing else differs
        base = load_config_file(f"{ROOT / 'configs' / 'txl.py'}:cpu")
        mine = to_dict(cfg)
        mine["model"]["memory"], mine["name"] = "xl", base.name
        mine["model"]["block_recurrent"] = to_dict(base)["model"]["block_recurrent"]
        assert mine == to_dict(base)
    else:
        m = cfg.model
        assert (m.num_layers, m.d_model, m.num_heads, m.dim_per_head, m.d_ff) == (12, 1024, 8, 128, 4096)
        assert (b.block_len, m.mem_len, b.state_size, b.layer, cfg.data.seq_len) == (512, 512, 512, -3, 4096)


@pytest.mark.parametrize("change, key", [
    (dict(block_len=5), "model.block_recurrent.block_len"),
    (dict(block_len=0), "model.block_recurrent.block_len"),
    (dict(state_size=0), "model.block_recurrent.state_size"),
    (dict(layer=4), "model.block_recurrent.layer"),
    (dict(layer=-5), "model.block_recurrent.layer"),
    (dict(gate="gru"), "model.block_recurrent.gate"),
])
def test_bad_options_name_their_key(change, key):
    cfg = load_config_file(f"{ROOT / 'configs' / 'block_recurrent.py'}:cpu")
    cfg.model.block_recurrent = dataclasses.replace(cfg.model.block_recurrent, **change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, 8)
