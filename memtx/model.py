"""Decoder-only Transformer LM: embeddings, the layer stack of its memory kind (`cfg.memory`,
memtx/memory/registry.py: Transformer-XL recurrence (M = 0: Transformer+RPE), LaMemo's
look-ahead memory, the Compressive Transformer's), optionally the Memorizing Transformer's kNN
memory in the layers `cfg.knn` names, and the output layer.

`TransformerLM.__call__(inputs_BN, memory, num_valid_B)` returns the logits and the new memory
(with `cfg.adaptive_cutoffs`: adaptive input/softmax, and the logits are normalised log-probs);
`segment_nll` is the one function the train step, evaluation and generation all call for a
segment: reset the rows that start a document, run the model, score the targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.adaptive import AdaptiveIO
from memtx.attention import param_with_axes
from memtx.layers import LayerNorm
from memtx.memory import model_memory, registry
from memtx.memory.kind import Segment

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


class TransformerLM(nn.Module):
    cfg: ModelConfig
    # LaMemo: also compute the last layer's memory rows, which feed nothing (the golden tests
    # compare them with the reference); off, that layer's FFN skips them (7% of the CPU preset).
    last_memory_output: bool = False

    @nn.compact
    def __call__(self, inputs_BN, memory: dict, num_valid_B, deterministic: bool = True, *,
                 cache=None, position=None, return_cache: bool = False):
        """(logits, new memory) of a segment. Generation inside a segment (XL / kNN / RPE models):
        `return_cache=True` also returns each layer's attention cache ({"k", "v": [B, M+N, H, Dh],
        "r": [M+N, H, Dh]}); called with that `cache` and `position` p, `inputs_BN` are the n new
        tokens at segment positions p..p+n-1, the logits are theirs, the memory is returned
        unchanged (a segment is written when it is run whole) and the cache comes back updated."""
        cfg = self.cfg
        kind = registry.of(cfg)
        if (cache is not None or return_cache) and not kind.kv_cache:
            raise ValueError(f"{kind.label} memory has no attention cache: its memory is refreshed by the whole segment")
        V, Vp, D = cfg.vocab_size, cfg.padded_vocab_size, cfg.d_model
        H, Dh = cfg.num_heads, cfg.dim_per_head
        init = nn.initializers.normal(cfg.init_std)
        if cfg.adaptive_cutoffs:  # adaptive input and softmax (memtx/adaptive.py), tied
            adaptive = AdaptiveIO(cfg, name="adaptive")
            h_BND = adaptive.embed(inputs_BN)
        else:
            embedding_VD = param_with_axes(self, "embedding", (Vp, D), ("vocab", "embed"), init)
            out_bias_V = param_with_axes(self, "out_bias", (Vp,), ("vocab",), nn.initializers.zeros)
            # One-hot matmul rather than a gather: it partitions cleanly with the vocabulary sharded.
            one_hot_BNV = jax.nn.one_hot(inputs_BN, Vp, dtype=cfg.dtype)
            h_BND = jnp.einsum("bnv,vd->bnd", one_hot_BNV, embedding_VD.astype(cfg.dtype)) * jnp.sqrt(D).astype(cfg.dtype)
        if cfg.content_bias:
            u_HD = param_with_axes(self, "u_bias", (H, Dh), ("heads", "kv"), init)  # shared by all layers
        else:  # no u.k term (meliad): a zero bias, not a parameter
            u_HD = jnp.zeros((H, Dh), jnp.float32)
        v_HD = param_with_axes(self, "v_bias", (H, Dh), ("heads", "kv"), init)
        h_BND = nn.with_logical_constraint(h_BND, ("act_batch", "act_seq", "act_embed"))
        emb_BND = h_BND
        h_BND = nn.Dropout(cfg.dropout)(h_BND, deterministic=deterministic)
        # The registry says what the kind's stack carries: the kNN add-on's stores, an attention cache.
        segment = Segment(h_BND, emb_BND, num_valid_B, u_HD, v_HD, deterministic,
                          knn_stores=memory["knn"] if kind.knn else None,
                          cache=cache if kind.kv_cache else None, position=position if kind.kv_cache else None)
        out = kind.layers.stack(self, segment, memory[kind.name])
        h_BND, new_cache = out.h_BND, out.cache
        new_memory = memory if cache is not None else \
            {kind.name: out.state, "knn": out.knn_stores if kind.knn else memory["knn"]}
        if cfg.pre_norm:
            h_BND = LayerNorm(cfg.layer_norm_eps, name="final_norm")(h_BND)
        self.sow("intermediates", "output_hidden", h_BND)  # the output layer's input: the output cache's keys
        h_BND = nn.Dropout(cfg.dropout)(h_BND, deterministic=deterministic)

        if cfg.adaptive_cutoffs:
            # Normalised log-probabilities [B, N, V] (float32) serve as the logits: log_softmax of
            # them (segment_nll, sampling) leaves them unchanged.
            logits_BNV = nn.with_logical_constraint(adaptive.log_probs(h_BND), ("act_batch", "act_seq", "act_vocab"))
            return (logits_BNV, new_memory, new_cache) if cache is not None or return_cache else (logits_BNV, new_memory)
        logits_BNV = jnp.einsum("bnd,vd->bnv", h_BND, embedding_VD.astype(h_BND.dtype),
                                preferred_element_type=jnp.float32) + out_bias_V
        if Vp != V:  # padded rows of the embedding exist only for sharding; never predicted
            logits_BNV = jnp.where(jnp.arange(Vp) < V, logits_BNV, -1e30)
        logits_BNV = nn.with_logical_constraint(logits_BNV, ("act_batch", "act_seq", "act_vocab"))
        return (logits_BNV, new_memory, new_cache) if cache is not None or return_cache else (logits_BNV, new_memory)


def init_memory(cfg: ModelConfig, batch_size: int) -> dict:
    return model_memory.init(cfg, batch_size)


def segment_nll(model: TransformerLM, params, memory: dict, batch: dict, *, deterministic=True, rngs=None,
                with_intermediates=False, with_aux_loss=False):
    """One segment: reset rows starting a document, run the model, per-token NLL.

    batch: inputs/targets int [B, N], weights float [B, N] (valid prefix), reset bool [B].
    Returns (nll_BN with padding zeroed, new_memory[, the layers' sown intermediates][, the memory's
    auxiliary loss: the sum of what it sowed as "losses" (the Compressive Transformer's attention
    reconstruction), None if nothing]).
    """
    memory = model_memory.reset_rows(memory, batch["reset"])
    num_valid_B = jnp.sum(batch["weights"] > 0, axis=-1).astype(jnp.int32)
    mutable = ["intermediates"] * with_intermediates + ["losses"] * with_aux_loss
    (logits_BNV, memory), state = model.apply({"params": params}, batch["inputs"], memory, num_valid_B,
                                              deterministic=deterministic, rngs=rngs, mutable=mutable)
    logp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
    nll_BN = -jnp.take_along_axis(logp_BNV, batch["targets"][..., None], axis=-1)[..., 0]
    out = (nll_BN * batch["weights"], memory)
    if with_intermediates:
        out += (state.get("intermediates", {}),)
    if with_aux_loss:
        losses = jax.tree.leaves(state.get("losses", {}))
        out += (sum(losses) if losses else None,)
    return out
