"""What the golden-tensor tests of every mechanism share: the reference's segments as our
batches, and the check of one segment's gradients against the reference's."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from memtx.config import ModelConfig
from memtx.model import TransformerLM, init_memory, segment_nll

SHARED_GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden")


def golden_path(name: str) -> str:
    return os.path.join(SHARED_GOLDEN, name)


def requires_golden(path: str):
    """Skips, naming the path, when the reference tensors are absent (a clone without ../shared);
    never under CI (CI=true), which has ../shared beside the clone: there a missing file fails
    the test instead of silently passing the suite without its reference checks."""
    import pytest
    return pytest.mark.skipif(not os.path.exists(path) and os.environ.get("CI") != "true",
                              reason=f"golden tensors not found at {path}")


def segment_batch(g, scen, s):
    """Segment `s` of scenario `scen` as a batch (the reference is time-major: [T, B])."""
    inputs = g[f"{scen}/seg{s}/input"].T.astype(np.int32)  # -> [B, T]
    targets = g[f"{scen}/seg{s}/target"].T.astype(np.int32)
    B = inputs.shape[0]
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
            "weights": jnp.ones(inputs.shape, jnp.float32), "reset": jnp.asarray(np.full(B, s == 0))}


def assert_gradients_match(golden, model_config, params_from_reference) -> None:
    """Gradients of the mean NLL of the last `grad_base` segment (earlier segments only carry
    memory, treated as constant) equal the reference's to 1e-5 relative to each tensor's scale."""
    ref = json.loads(str(golden["config_json"]))
    info = ref["scenarios"]["grad_base"]
    cfg = model_config(ref, info["mem_len"])
    model = TransformerLM(cfg)
    params = params_from_reference(golden, cfg.num_layers, cfg.num_heads, cfg.dim_per_head)
    data = golden["data"].T.astype(np.int32)  # [B, T]
    B = data.shape[0]
    memory = init_memory(cfg, B)
    pos = 0
    for s, seg_len in enumerate(info["seg_lens"]):
        batch = {"inputs": jnp.asarray(data[:, pos:pos + seg_len]), "targets": jnp.asarray(data[:, pos + 1:pos + seg_len + 1]),
                 "weights": jnp.ones((B, seg_len)), "reset": jnp.full((B,), s == 0)}
        pos += seg_len
        if s < len(info["seg_lens"]) - 1:
            _, memory = segment_nll(model, params, memory, batch)
            continue

        def loss_fn(p):
            nll, _ = segment_nll(model, p, memory, batch)
            return nll.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss), float(golden["grad_base/loss"]), rtol=1e-6)
    ref_grads = params_from_reference({k.replace("grad_base/grad/", "param/"): v for k, v in golden.items()
                                       if k.startswith("grad_base/grad/")}, cfg.num_layers, cfg.num_heads, cfg.dim_per_head)
    # The embedding is tied: the reference reports one gradient for word_emb (= crit weight).
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    for path, theirs in jax.tree_util.tree_flatten_with_path(ref_grads)[0]:
        ours = np.asarray(flat_ours[path])
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-5 * scale, rtol=1e-5,
                                   err_msg=f"gradient of {jax.tree_util.keystr(path)}")


def reference_model_config(ref: dict, mem_len: int, **fields) -> ModelConfig:
    """Our ModelConfig of a reference model (its config_json), dropout off."""
    return ModelConfig(vocab_size=ref["n_token"], vocab_pad_multiple=1, num_layers=ref["n_layer"],
                       d_model=ref["d_model"], num_heads=ref["n_head"], head_dim=ref["d_head"],
                       d_ff=ref["d_inner"], mem_len=mem_len, pre_norm=ref["pre_lnorm"], dropout=0.0, **fields)


def reference_params(g: dict, n_layer: int, attention, extra_biases: dict = ()) -> dict:
    """The reference state dict (torch Linear weights are (out, in)) as our parameters: what every
    reference model shares (embedding, output bias, u and v, layer norms, FFN), with
    `attention(p, prefix, d_model)` mapping one layer's attention weights and `extra_biases`
    naming more global biases (ours: theirs)."""
    p = lambda name: jnp.asarray(g[f"param/{name}"])  # noqa: E731
    d_model = g["param/word_emb.emb_layers.0.weight"].shape[1]
    biases = {"u_bias": "r_w_bias", "v_bias": "r_r_bias", **dict(extra_biases)}
    params = {"embedding": p("word_emb.emb_layers.0.weight"), "out_bias": p("crit.out_layers.0.bias"),
              **{ours: p(theirs) for ours, theirs in biases.items()}}
    for i in range(n_layer):
        pre = f"layers.{i}"
        params[f"layer_{i}"] = {
            "attn": attention(p, pre, d_model),
            "attn_norm": {"scale": p(f"{pre}.dec_attn.layer_norm.weight"), "bias": p(f"{pre}.dec_attn.layer_norm.bias")},
            "ffn": {
                "wi": p(f"{pre}.pos_ff.CoreNet.0.weight").T, "bi": p(f"{pre}.pos_ff.CoreNet.0.bias"),
                "wo": p(f"{pre}.pos_ff.CoreNet.3.weight").T, "bo": p(f"{pre}.pos_ff.CoreNet.3.bias"),
            },
            "ffn_norm": {"scale": p(f"{pre}.pos_ff.layer_norm.weight"), "bias": p(f"{pre}.pos_ff.layer_norm.bias")},
        }
    return params
