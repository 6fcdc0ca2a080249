"""Decoder-only Transformer LM with Transformer-XL recurrence memory (M = 0: Transformer+RPE)
and, in the layers `cfg.knn` names, the Memorizing Transformer's kNN memory; or, with
`cfg.memory_type = "lamemo"`, LaMemo's look-ahead memory (spec §2) instead of the XL cache.

`TransformerLM.__call__(inputs_BN, memory, num_valid_B)` returns the logits and the new memory
(with `cfg.adaptive_cutoffs`: adaptive input/softmax, and the logits are normalised log-probs);
`segment_nll` is the one function the train step, evaluation and generation all call for a
segment: reset the rows that start a document, run the model, score the targets.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.adaptive import AdaptiveIO
from memtx.attention import RelativeAttention, param_with_axes
from memtx.config import ModelConfig
from memtx.lamemo_layer import LaMemoAttention
from memtx.memory import lamemo, model_memory, xl


class LayerNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        scale = param_with_axes(self, "scale", (D,), ("embed",), nn.initializers.ones)
        bias = param_with_axes(self, "bias", (D,), ("embed",), nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class FeedForward(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BND, deterministic: bool = True):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        wi = param_with_axes(self, "wi", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), init)
        bi = param_with_axes(self, "bi", (cfg.d_ff,), ("mlp",), nn.initializers.zeros)
        wo = param_with_axes(self, "wo", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), init)
        bo = param_with_axes(self, "bo", (cfg.d_model,), ("embed",), nn.initializers.zeros)
        h_BNF = jax.nn.relu(x_BND.astype(dtype) @ wi.astype(dtype) + bi.astype(dtype))
        h_BNF = nn.with_logical_constraint(h_BNF, ("act_batch", "act_seq", "act_mlp"))
        h_BNF = nn.Dropout(cfg.dropout)(h_BNF, deterministic=deterministic)
        return h_BNF @ wo.astype(dtype) + bo.astype(dtype)


class XLLayer(nn.Module):
    """Relative attention over [memory ; segment] and a ReLU FFN; post-LN or pre-LN."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic: bool = True,
                 knn_memory=None, num_valid_B=None, cache=None, position=None):
        """Returns (output, new kNN memory or None, attention cache); see RelativeAttention for
        `cache` / `position` (generation inside a segment)."""
        cfg = self.cfg
        attn = RelativeAttention(cfg, name="attn")
        ffn = FeedForward(cfg, name="ffn")
        attn_norm = LayerNorm(cfg.layer_norm_eps, name="attn_norm")
        ffn_norm = LayerNorm(cfg.layer_norm_eps, name="ffn_norm")
        drop = nn.Dropout(cfg.dropout)
        if cfg.pre_norm:
            mem_in_BMD = attn_norm(mem_BMD) if cache is None else mem_BMD  # cached: keys already computed
            a, knn_memory, cache = attn(attn_norm(h_BND), mem_in_BMD, mem_valid_BM, u_HD, v_HD, deterministic,
                                        knn_memory, num_valid_B, cache, position)
            h_BND = h_BND + drop(a, deterministic=deterministic)
            f = ffn(ffn_norm(h_BND), deterministic)
            h_BND = h_BND + drop(f, deterministic=deterministic)
        else:
            a, knn_memory, cache = attn(h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic, knn_memory,
                                        num_valid_B, cache, position)
            h_BND = attn_norm(h_BND + drop(a, deterministic=deterministic))
            f = ffn(h_BND, deterministic)
            h_BND = ffn_norm(h_BND + drop(f, deterministic=deterministic))
        self.sow("intermediates", "out", h_BND)
        return nn.with_logical_constraint(h_BND, ("act_batch", "act_seq", "act_embed")), knn_memory, cache


class LaMemoLayer(nn.Module):
    """LaMemo attention (spec §2), then the shared W_O / residual / LayerNorm for the memory rows
    and the current rows alike, and one FFN over [o_mem ; o_cur]. Post-LN or pre-LN.

    Returns (o_cur [B,N,D], o_mem [B,M,D], C' [B,M,H,Dh], logS' [B,M,H], a [B,N,H,Dh], logZ [B,N,H]).
    The last layer's o_mem feeds nothing (the state keeps C', not hidden states): with
    `memory_output=False` the FFN runs over the current rows only and o_mem is None.
    """

    cfg: ModelConfig
    memory_output: bool = True

    @nn.compact
    def __call__(self, h_BND, mem_BMD, mem_valid_BM, C_BMHD, logS_BMH, u_HD, v_HD, v_minus_HD,
                 num_valid_B=None, deterministic: bool = True):
        cfg = self.cfg
        attn = LaMemoAttention(cfg, name="attn")
        ffn = FeedForward(cfg, name="ffn")
        attn_norm = LayerNorm(cfg.layer_norm_eps, name="attn_norm")
        ffn_norm = LayerNorm(cfg.layer_norm_eps, name="ffn_norm")
        drop = nn.Dropout(cfg.dropout)
        attn_in = (attn_norm(h_BND), attn_norm(mem_BMD)) if cfg.pre_norm else (h_BND, mem_BMD)
        proj_cur, proj_mem, new_C, new_logS, a, logZ = attn(
            *attn_in, mem_valid_BM, C_BMHD, logS_BMH, u_HD, v_HD, v_minus_HD, num_valid_B, deterministic)
        # LayerNorm and FFN act per row: the memory rows join only where a next layer reads them.
        rows = [mem_BMD + drop(proj_mem, deterministic=deterministic)] if self.memory_output else []
        rows.append(h_BND + drop(proj_cur, deterministic=deterministic))
        both_BKD = jnp.concatenate(rows, axis=1)
        if cfg.pre_norm:
            both_BKD = both_BKD + drop(ffn(ffn_norm(both_BKD), deterministic), deterministic=deterministic)
        else:
            both_BKD = attn_norm(both_BKD)
            both_BKD = ffn_norm(both_BKD + drop(ffn(both_BKD, deterministic), deterministic=deterministic))
        M = mem_BMD.shape[1] if self.memory_output else 0
        o_mem_BMD, o_cur_BND = (both_BKD[:, :M] if self.memory_output else None), both_BKD[:, M:]
        self.sow("intermediates", "out", o_cur_BND)
        if self.memory_output:
            self.sow("intermediates", "out_mem", o_mem_BMD)
        o_cur_BND = nn.with_logical_constraint(o_cur_BND, ("act_batch", "act_seq", "act_embed"))
        return o_cur_BND, o_mem_BMD, new_C, new_logS, a, logZ


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
        if (cache is not None or return_cache) and cfg.memory_type == "lamemo":
            raise ValueError("LaMemo has no attention cache: its memory is refreshed by the whole segment")
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
        if cfg.memory_type == "lamemo":
            h_BND, new_memory = self.lamemo_layers(h_BND, emb_BND, memory, num_valid_B, u_HD, v_HD, deterministic)
            new_cache = None
        else:
            h_BND, new_memory, new_cache = self.xl_layers(h_BND, memory, num_valid_B, u_HD, v_HD, deterministic,
                                                          cache, position)
        if cfg.pre_norm:
            h_BND = LayerNorm(cfg.layer_norm_eps, name="final_norm")(h_BND)
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

    def xl_layers(self, h_BND, memory, num_valid_B, u_HD, v_HD, deterministic, cache=None, position=None):
        cfg = self.cfg
        xl_memory, knn_memory = memory["xl"], dict(memory["knn"])
        mem_valid_BM = xl.valid_mask(xl_memory)
        layer_inputs, new_cache = [], []
        for layer in range(cfg.num_layers):
            layer_inputs.append(h_BND)
            h_BND, new_knn, layer_cache = XLLayer(cfg, name=f"layer_{layer}")(
                h_BND, xl_memory["hidden"][layer], mem_valid_BM, u_HD, v_HD, deterministic,
                knn_memory.get(str(layer)), num_valid_B, None if cache is None else cache[layer], position)
            new_cache.append(layer_cache)
            if new_knn is not None:
                knn_memory[str(layer)] = new_knn
        if cache is not None:  # generation inside a segment: the memories are written by whole segments
            return h_BND, memory, new_cache
        return h_BND, {"xl": xl.write(xl_memory, jnp.stack(layer_inputs), num_valid_B), "knn": knn_memory}, new_cache

    def lamemo_layers(self, h_BND, emb_BND, memory, num_valid_B, u_HD, v_HD, deterministic):
        """Layer l reads memory rows m (E_mem for l = 0, else layer l-1's refreshed o_mem) and x."""
        cfg = self.cfg
        H, Dh = cfg.num_heads, cfg.dim_per_head
        v_minus_HD = None  # the look-ahead bias: only the disentangled encoding has one
        if cfg.lamemo.look_ahead and cfg.lamemo.encoding == "disentangled":
            v_minus_HD = param_with_axes(self, "v_minus_bias", (H, Dh), ("heads", "kv"),
                                         nn.initializers.normal(cfg.init_std))
        state = memory["lamemo"]
        mem_valid_BM = lamemo.valid_mask(state)
        mem_BMD = nn.Dropout(cfg.dropout)(state["emb"].astype(h_BND.dtype), deterministic=deterministic)
        refreshed_C, refreshed_logS, cur_C, cur_logZ = [], [], [], []
        for layer in range(cfg.num_layers):
            needed = layer < cfg.num_layers - 1 or self.last_memory_output
            h_BND, mem_BMD, new_C, new_logS, a, logZ = LaMemoLayer(cfg, memory_output=needed, name=f"layer_{layer}")(
                h_BND, mem_BMD, mem_valid_BM, state["C"][layer], state["logS"][layer], u_HD, v_HD, v_minus_HD,
                num_valid_B, deterministic)
            refreshed_C.append(new_C), refreshed_logS.append(new_logS), cur_C.append(a), cur_logZ.append(logZ)
        new_state = lamemo.write(state, emb_BND, jnp.stack(refreshed_C), jnp.stack(refreshed_logS),
                                 jnp.stack(cur_C), jnp.stack(cur_logZ), num_valid_B)
        return h_BND, {"lamemo": new_state, "knn": dict(memory["knn"])}


def init_memory(cfg: ModelConfig, batch_size: int) -> dict:
    return model_memory.init(cfg, batch_size)


def segment_nll(model: TransformerLM, params, memory: dict, batch: dict, *, deterministic=True, rngs=None,
                with_intermediates=False):
    """One segment: reset rows starting a document, run the model, per-token NLL.

    batch: inputs/targets int [B, N], weights float [B, N] (valid prefix), reset bool [B].
    Returns (nll_BN with padding zeroed, new_memory[, the layers' sown intermediates]).
    """
    memory = model_memory.reset_rows(memory, batch["reset"])
    num_valid_B = jnp.sum(batch["weights"] > 0, axis=-1).astype(jnp.int32)
    (logits_BNV, memory), state = model.apply({"params": params}, batch["inputs"], memory, num_valid_B,
                                              deterministic=deterministic, rngs=rngs,
                                              mutable=["intermediates"] if with_intermediates else [])
    logp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
    nll_BN = -jnp.take_along_axis(logp_BNV, batch["targets"][..., None], axis=-1)[..., 0]
    if with_intermediates:
        return nll_BN * batch["weights"], memory, state.get("intermediates", {})
    return nll_BN * batch["weights"], memory
