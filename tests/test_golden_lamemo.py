"""Cross-check the LaMemo layer (spec §2) against tensors from the LaMemo authors' code.

The reference tensors live in ../shared/golden/golden_lamemo.npz (see its README): per scenario
and segment the logits (refreshed memory rows first), NLL, carried state (embedding memory, C_l,
logS_l), every layer's outputs, interpolation weights alpha and both attention probabilities;
and gradients of one segment. The reference memory grows from empty; ours is a fixed M-slot
buffer, right-aligned, so the reference's M_ref rows are our last M_ref slots.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import ModelConfig
from memtx.memory import model_memory
from memtx.model import TransformerLM, init_memory
from tests.golden import (assert_gradients_match, golden_path, reference_model_config, reference_params,
                          requires_golden, segment_batch)

GOLDEN = golden_path("golden_lamemo.npz")
pytestmark = requires_golden(GOLDEN)
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def model_config(ref: dict, mem_len: int) -> ModelConfig:
    return reference_model_config(ref, mem_len, memory="lamemo")


def params_from_reference(g: dict, n_layer: int, n_head: int, d_head: int) -> dict:
    def attention(p, pre, d_model):
        return {
            "q": p(f"{pre}.dec_attn.q_net.weight").T.reshape(d_model, n_head, d_head),
            "kv": p(f"{pre}.dec_attn.kv_net.weight").T.reshape(d_model, 2, n_head, d_head),
            "r_proj": p(f"{pre}.dec_attn.r_net.weight").T.reshape(d_model, n_head, d_head),
            "out": p(f"{pre}.dec_attn.o_net.weight").T.reshape(n_head, d_head, d_model),
        }

    return reference_params(g, n_layer, attention, {"v_minus_bias": "r_r_bias_future"})


def close(ours, theirs, what):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=0, err_msg=what)


@pytest.mark.parametrize("scen", ["base", "longmem", "shortmem"])
@pytest.mark.slow
def test_forward_matches_reference(golden, scen):
    ref = json.loads(str(golden["config_json"]))
    info = ref["scenarios"][scen]
    M = info["mem_len"]
    cfg = model_config(ref, M)
    model = TransformerLM(cfg, last_memory_output=True)  # the reference returns its memory rows too
    params = params_from_reference(golden, cfg.num_layers, cfg.num_heads, cfg.dim_per_head)
    B = golden["data"].shape[1]
    memory = init_memory(cfg, B)
    for s, seg_len in enumerate(info["seg_lens"]):
        at = lambda key: golden[f"{scen}/seg{s}/{key}"]
        batch = segment_batch(golden, scen, s)
        assert batch["inputs"].shape[1] == seg_len
        memory_in = model_memory.reset_rows(memory, batch["reset"])
        (logits, memory), state = model.apply(
            {"params": params}, batch["inputs"], memory_in, jnp.full((B,), seg_len, jnp.int32),
            mutable=["intermediates"])
        nll = -jax.nn.log_softmax(logits)[np.arange(B)[:, None], np.arange(seg_len)[None], batch["targets"]]
        where = f"{scen} segment {s}"
        m_in = at("layer0/out_mem").shape[0]  # the reference's memory length before this segment
        close(logits, at("logits")[m_in:].transpose(1, 0, 2), f"logits, {where}")
        close(nll, at("nll").T, f"nll, {where}")
        inter = state["intermediates"]
        for layer in range(cfg.num_layers):
            ours = inter[f"layer_{layer}"]
            close(ours["out"][0], at(f"layer{layer}/out").transpose(1, 0, 2), f"out, layer {layer}, {where}")
            out_mem = np.asarray(ours["out_mem"][0])[:, M - m_in:]  # [B, m_in, D]
            close(out_mem, at(f"layer{layer}/out_mem").transpose(1, 0, 2), f"out_mem, layer {layer}, {where}")
            if m_in == 0:
                assert f"{scen}/seg{s}/layer{layer}/attn_prob" not in golden
                continue
            probs = np.asarray(ours["attn"]["attn_prob"][0])  # [B, H, N, M+N]
            theirs = at(f"layer{layer}/attn_prob").transpose(2, 3, 0, 1)  # [B, H, N, m_in+N]
            k_ref = theirs.shape[-1]
            close(probs[..., -k_ref:], theirs, f"attention probabilities, layer {layer}, {where}")
            assert np.all(probs[..., :-k_ref] == 0), "probability mass on empty memory slots"
            probs_mem = np.asarray(ours["attn"]["attn_prob_mem"][0])[:, :, M - m_in:]  # [B, H, m_in, W]
            theirs_mem = at(f"layer{layer}/attn_prob_mem").transpose(2, 3, 0, 1)  # [B, H, m_in, W_ref]
            w_ref = theirs_mem.shape[-1]
            close(probs_mem[..., -w_ref:], theirs_mem, f"look-ahead probabilities, layer {layer}, {where}")
            assert np.all(probs_mem[..., :-w_ref] == 0), "look-ahead mass outside the window"
            alpha = np.asarray(ours["attn"]["alpha"][0])[:, M - m_in:]  # [B, m_in, H]
            close(alpha, at(f"layer{layer}/alpha").transpose(1, 0, 2), f"alpha, layer {layer}, {where}")
        # Memory rows of the last layer are the reference's first hidden/logit rows.
        if m_in:
            hidden_mem = np.asarray(inter[f"layer_{cfg.num_layers - 1}"]["out_mem"][0])[:, M - m_in:]
            close(hidden_mem, at("hidden")[:m_in].transpose(1, 0, 2), f"memory hidden rows, {where}")
            mem_logits = hidden_mem @ np.asarray(params["embedding"]).T + np.asarray(params["out_bias"])
            close(mem_logits, at("logits")[:m_in].transpose(1, 0, 2), f"memory logits, {where}")
        # Carried state: [embedding memory, C_0, logS_0, C_1, logS_1, ...], right-aligned.
        lam = memory["lamemo"]
        m_out = at("mem_out/0").shape[0]
        np.testing.assert_array_equal(np.asarray(lam["length"]), np.full(B, m_out))
        close(np.asarray(lam["emb"])[:, M - m_out:], at("mem_out/0").transpose(1, 0, 2), f"embedding memory, {where}")
        assert lam["logS"].dtype == jnp.float32
        for layer in range(cfg.num_layers):
            close(np.asarray(lam["C"][layer])[:, M - m_out:], at(f"mem_out/{1 + 2 * layer}").transpose(1, 0, 2, 3),
                  f"C, layer {layer}, {where}")
            close(np.asarray(lam["logS"][layer])[:, M - m_out:], at(f"mem_out/{2 + 2 * layer}").transpose(1, 0, 2),
                  f"logS, layer {layer}, {where}")


@pytest.mark.slow
def test_gradients_match_reference(golden):
    assert_gradients_match(golden, model_config, params_from_reference)
