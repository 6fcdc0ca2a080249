"""Cross-check the Transformer-XL layer against tensors from the LaMemo authors' code.

The reference tensors live in ../shared/golden/golden_txl.npz (see its README): logits, carried
memory and attention probabilities per scenario and segment, and gradients of one segment.
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

GOLDEN = golden_path("golden_txl.npz")
pytestmark = requires_golden(GOLDEN)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def model_config(ref: dict, mem_len: int) -> ModelConfig:
    return reference_model_config(ref, mem_len)


def params_from_reference(g: dict, n_layer: int, n_head: int, d_head: int) -> dict:
    def attention(p, pre, d_model):
        return {
            "qkv": p(f"{pre}.dec_attn.qkv_net.weight").T.reshape(d_model, 3, n_head, d_head),
            "r_proj": p(f"{pre}.dec_attn.r_net.weight").T.reshape(d_model, n_head, d_head),
            "out": p(f"{pre}.dec_attn.o_net.weight").T.reshape(n_head, d_head, d_model),
        }

    return reference_params(g, n_layer, attention)


@pytest.mark.parametrize("scen", ["base", "longmem", "shortmem"])
def test_forward_matches_reference(golden, scen):
    ref = json.loads(str(golden["config_json"]))
    info = ref["scenarios"][scen]
    mem_len = info["mem_len"]
    cfg = model_config(ref, mem_len)
    model = TransformerLM(cfg)
    params = params_from_reference(golden, cfg.num_layers, cfg.num_heads, cfg.dim_per_head)
    B = golden["data"].shape[1]
    memory = init_memory(cfg, B)
    for s, seg_len in enumerate(info["seg_lens"]):
        batch = segment_batch(golden, scen, s)
        assert batch["inputs"].shape[1] == seg_len
        (logits, memory), state = model.apply(
            {"params": params}, batch["inputs"], model_memory.reset_rows(memory, batch["reset"]),
            jnp.full((B,), seg_len, jnp.int32), mutable=["intermediates"])
        nll = -jax.nn.log_softmax(logits)[np.arange(B)[:, None], np.arange(seg_len)[None], batch["targets"]]
        where = f"{scen} segment {s}"
        np.testing.assert_allclose(np.asarray(logits), golden[f"{scen}/seg{s}/logits"].transpose(1, 0, 2),
                                   atol=1e-5, rtol=0, err_msg=f"logits, {where}")
        np.testing.assert_allclose(np.asarray(nll), golden[f"{scen}/seg{s}/nll"].T, atol=1e-5, rtol=0,
                                   err_msg=f"nll, {where}")
        inter = state["intermediates"]
        for layer in range(cfg.num_layers):
            ours = np.asarray(inter[f"layer_{layer}"]["attn"]["attn_prob"][0])  # [B, H, N, K=M+N]
            theirs = golden[f"{scen}/seg{s}/layer{layer}/attn_prob"].transpose(2, 3, 0, 1)  # [B, H, N, Kref]
            k_ref = theirs.shape[-1]
            np.testing.assert_allclose(ours[..., -k_ref:], theirs, atol=1e-5, rtol=0,
                                       err_msg=f"attention probabilities, layer {layer}, {where}")
            assert np.all(ours[..., :-k_ref] == 0), "probability mass on empty memory slots"
            np.testing.assert_allclose(np.asarray(inter[f"layer_{layer}"]["out"][0]),
                                       golden[f"{scen}/seg{s}/layer{layer}/out"].transpose(1, 0, 2), atol=1e-5, rtol=0)
            mem_ref = golden[f"{scen}/seg{s}/mem_out/{layer}"].transpose(1, 0, 2)  # [B, Mref, D]
            m_ref = mem_ref.shape[1]
            np.testing.assert_array_equal(np.asarray(memory["xl"]["length"]), np.full(B, m_ref))
            np.testing.assert_allclose(np.asarray(memory["xl"]["hidden"][layer][:, mem_len - m_ref:]), mem_ref,
                                       atol=1e-5, rtol=0, err_msg=f"carried memory, layer {layer}, {where}")


def test_gradients_match_reference(golden):
    assert_gradients_match(golden, model_config, params_from_reference)
