"""LaMemo attention (spec §2 steps 1-3): causal attention of the current queries plus look-ahead
attention of the memory queries, and the interpolation that refreshes the memory.

With X = [m ; x] (M memory rows, N current rows, K = M+N) and q, k, v projections of X:

  current query i (position M+i), key j <= M+i, distance d = M+i-j (as in attention.py):
      score(i, j) = [ (q_i + u)·k_j + (q_i + v)·(W_R · sinusoid(d)) ] / sqrt(Dh)
  memory query p, key j in the newest W = min(M, N) positions ending at M, j > p, distance j-p:
      t(p, j) = [ (q_p + u)·k_j + (q_p + v_minus)·(W_R · sinusoid(j - p)) ] / sqrt(Dh)

Ablations (cfg.lamemo, the paper's Table 3): `interpolation=False` sets alpha = 0 (C' = ã,
logS' = logZ'); `look_ahead=False` skips steps 2-3 (C' = C: each slot keeps the output it had when
it was current, so the forward pass is Transformer-XL's); `encoding="xl"` scores the look-ahead
with Transformer-XL's encoding, the signed distance p - j < 0 and the look-back bias v.

Both position terms are computed once per distance and gathered by distance. The memory slots'
carried outputs C and log-denominators logS are interpolated with the look-ahead result:
alpha = S / (S + Z' + 1e-6) in float32 (after subtracting max(logS, logZ'), as the reference),
not stop-gradient'ed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import NEG_INF, distance_sinusoid, gather_by_distance, param_with_axes, xl_scores
from memtx.layers import layer_class, layer_parts, layer_runs, run_name, scan_run
from memtx.memory.kind import Segment, StackOutput
from memtx.memory.lamemo import state as lamemo

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig

ALPHA_EPS = 1e-6


class LaMemoAttention(nn.Module):
    """Returns (W_O·a [B,N,D], W_O·C' [B,M,D], C' [B,M,H,Dh], logS' [B,M,H] f32, a [B,N,H,Dh], logZ [B,N,H] f32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BND, mem_BMD, mem_valid_BM, carried_C_BMHD, carried_logS_BMH, u_HD, v_HD, v_minus_HD,
                 num_valid_B=None, deterministic: bool = True):
        cfg = self.cfg
        H, Dh, D = cfg.num_heads, cfg.dim_per_head, cfg.d_model
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        w_q = param_with_axes(self, "q", (D, H, Dh), ("embed", "heads", "kv"), init)
        w_kv = param_with_axes(self, "kv", (D, 2, H, Dh), ("embed", "qkv", "heads", "kv"), init)
        w_r = param_with_axes(self, "r_proj", (D, H, Dh), ("embed", "heads", "kv"), init)
        w_o = param_with_axes(self, "out", (H, Dh, D), ("heads", "kv", "embed"), init)
        w_q, w_kv, w_r, w_o = (w.astype(dtype) for w in (w_q, w_kv, w_r, w_o))
        u_HD, v_HD = u_HD.astype(dtype), v_HD.astype(dtype)
        v_minus_HD = None if v_minus_HD is None else v_minus_HD.astype(dtype)
        scale = 1.0 / jnp.sqrt(jnp.float32(Dh))
        act_axes = ("act_batch", "act_seq", "act_heads", "act_kv")

        B, N, _ = x_BND.shape
        M = mem_BMD.shape[1]
        K = M + N
        X_BKD = jnp.concatenate([mem_BMD.astype(dtype), x_BND.astype(dtype)], axis=1)
        q_BKHD = nn.with_logical_constraint(jnp.einsum("bkd,dhe->bkhe", X_BKD, w_q), act_axes)
        k_BKHD = nn.with_logical_constraint(jnp.einsum("bkd,dhe->bkhe", X_BKD, w_kv[:, 0]), act_axes)
        v_BKHD = nn.with_logical_constraint(jnp.einsum("bkd,dhe->bkhe", X_BKD, w_kv[:, 1]), act_axes)
        key_valid_BK = jnp.concatenate([mem_valid_BM, jnp.ones((B, N), bool)], axis=1)

        # 1. Causal attention of the current queries over all K keys (Transformer-XL score).
        q_BNHD = q_BKHD[:, M:]
        r_KHD = jnp.einsum("kd,dhe->khe", distance_sinusoid(jnp.arange(K), D, cfg.clamp_len).astype(dtype),
                           w_r)  # distance 0..K-1
        distance_NK = M + jnp.arange(N)[:, None] - jnp.arange(K)[None, :]
        mask_BHNK = (distance_NK >= 0)[None, None] & key_valid_BK[:, None, None, :]
        scores_BHNK = jnp.where(mask_BHNK, xl_scores(q_BNHD + u_HD, q_BNHD + v_HD, k_BKHD, r_KHD,
                                                          batched_positions=False) * scale, NEG_INF)
        logZ_BHN = jax.nn.logsumexp(scores_BHNK, axis=-1)  # float32
        probs_BHNK = jnp.exp(scores_BHNK - logZ_BHN[..., None])
        self.sow("intermediates", "attn_prob", probs_BHNK)
        probs_BHNK = nn.Dropout(cfg.attn_dropout)(probs_BHNK, deterministic=deterministic)
        a_BNHD = jnp.einsum("bhnk,bkhd->bnhd", probs_BHNK.astype(dtype), v_BKHD)
        logZ_BNH = jnp.swapaxes(logZ_BHN, 1, 2)
        proj_cur_BND = jnp.einsum("bnhd,hde->bne", a_BNHD, w_o)
        if M == 0:  # Transformer+RPE: nothing to refresh
            empty_BMHD = jnp.zeros((B, 0, H, Dh), dtype)
            return (proj_cur_BND, jnp.zeros((B, 0, D), dtype), empty_BMHD, jnp.zeros((B, 0, H), jnp.float32),
                    a_BNHD, logZ_BNH)

        ablate = cfg.lamemo
        if not ablate.look_ahead:  # slots keep their outputs from when they were current
            C_BMHD = jax.lax.stop_gradient(carried_C_BMHD).astype(dtype)
            self.sow("intermediates", "alpha", jnp.ones((B, M, H), jnp.float32))
            return (proj_cur_BND, jnp.einsum("bmhd,hde->bme", C_BMHD, w_o), C_BMHD,
                    jax.lax.stop_gradient(carried_logS_BMH.astype(jnp.float32)), a_BNHD, logZ_BNH)

        # 2. Look-ahead attention of the memory queries over the W newest keys ending at position M.
        # A row whose segment is padded after n valid tokens uses min(M, n) keys, as a segment of
        # length n would: padding never changes what is written into the memory.
        W = min(M, N)
        if num_valid_B is None:
            num_valid_B = jnp.full((B,), N, jnp.int32)
        q_mem_BMHD = q_BKHD[:, :M]
        key_pos_W = jnp.arange(M - W + 1, M + 1)
        k_ahead_BWHD, v_ahead_BWHD = k_BKHD[:, M - W + 1:M + 1], v_BKHD[:, M - W + 1:M + 1]
        if ablate.encoding == "disentangled":  # sinusoid(|p - j|) = sinusoid(j - p), bias v_minus
            ahead_positions_M, ahead_bias_HD = jnp.arange(1, M + 1), v_minus_HD
        else:  # Transformer-XL's: sinusoid(p - j) of the signed (negative) distance, bias v
            ahead_positions_M, ahead_bias_HD = -jnp.arange(1, M + 1), v_HD
        r_ahead_MHD = jnp.einsum("md,dhe->mhe", distance_sinusoid(ahead_positions_M, D, cfg.clamp_len).astype(dtype), w_r)  # j - p = 1..M
        ac_BHMW = jnp.einsum("bmhd,bwhd->bhmw", q_mem_BMHD + u_HD, k_ahead_BWHD, preferred_element_type=jnp.float32)
        bd_BHMM_by_distance = jnp.einsum("bmhd,rhd->bhmr", q_mem_BMHD + ahead_bias_HD, r_ahead_MHD,
                                         preferred_element_type=jnp.float32)
        ahead_MW = key_pos_W[None, :] - jnp.arange(M)[:, None]  # j - p
        bd_BHMW = gather_by_distance(bd_BHMM_by_distance, ahead_MW - 1)
        in_window_BW = key_pos_W[None, :] > M - jnp.minimum(num_valid_B, M)[:, None]
        key_ok_BW = in_window_BW & key_valid_BK[:, M - W + 1:M + 1]
        mask_BHMW = (ahead_MW > 0)[None, None] & key_ok_BW[:, None, None, :]
        scores_BHMW = jnp.where(mask_BHMW, (ac_BHMW + bd_BHMW) * scale, NEG_INF)  # key M: masked only if n = 0
        logZ_ahead_BHM = jax.nn.logsumexp(scores_BHMW, axis=-1)  # float32
        probs_BHMW = jnp.exp(scores_BHMW - logZ_ahead_BHM[..., None])
        self.sow("intermediates", "attn_prob_mem", probs_BHMW)
        probs_BHMW = nn.Dropout(cfg.attn_dropout)(probs_BHMW, deterministic=deterministic)
        a_ahead_BMHD = jnp.einsum("bhmw,bwhd->bmhd", probs_BHMW.astype(dtype), v_ahead_BWHD)

        # 3. Interpolation with the carried state (constants); alpha keeps its gradient via logZ'.
        logS_BMH = jax.lax.stop_gradient(carried_logS_BMH.astype(jnp.float32))
        C_BMHD = jax.lax.stop_gradient(carried_C_BMHD).astype(jnp.float32)
        logZ_ahead_BMH = jnp.swapaxes(logZ_ahead_BHM, 1, 2)
        top_BMH = jnp.maximum(logS_BMH, logZ_ahead_BMH)
        S_BMH, Z_BMH = jnp.exp(logS_BMH - top_BMH), jnp.exp(logZ_ahead_BMH - top_BMH)
        if ablate.interpolation:
            alpha_BMH = S_BMH / (S_BMH + Z_BMH + ALPHA_EPS)
            new_logS_BMH = jnp.logaddexp(logS_BMH, logZ_ahead_BMH)
        else:  # the slot forgets what it saw before: only this look-ahead counts
            alpha_BMH = jnp.zeros_like(S_BMH)
            new_logS_BMH = logZ_ahead_BMH
        self.sow("intermediates", "alpha", alpha_BMH)
        new_C_BMHD = (alpha_BMH[..., None] * C_BMHD
                      + (1.0 - alpha_BMH[..., None]) * a_ahead_BMHD.astype(jnp.float32)).astype(dtype)
        proj_mem_BMD = jnp.einsum("bmhd,hde->bme", new_C_BMHD, w_o)
        return proj_cur_BND, proj_mem_BMD, new_C_BMHD, new_logS_BMH, a_BNHD, logZ_BNH


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
        ffn, attn_norm, ffn_norm, drop = layer_parts(cfg)
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


def scan_runs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The stack's layer ranges (layers.layer_runs): with `model.scan_layers` the last layer, which
    skips its memory rows, runs alone and the others as one scan."""
    return layer_runs(cfg, (cfg.num_layers - 1,))


def stack(model, segment: Segment, state: dict) -> StackOutput:
    """Layer l reads memory rows m (E_mem for l = 0, else layer l-1's refreshed o_mem) and x;
    then the state keeps the refreshed slots and this segment's outputs (spec §2 step 5)."""
    cfg = model.cfg
    h_BND, emb_BND, num_valid_B = segment.h_BND, segment.emb_BND, segment.num_valid_B
    u_HD, v_HD, deterministic = segment.u_HD, segment.v_HD, segment.deterministic
    H, Dh = cfg.num_heads, cfg.dim_per_head
    v_minus_HD = None  # the look-ahead bias: only the disentangled encoding has one
    if cfg.lamemo.look_ahead and cfg.lamemo.encoding == "disentangled":
        v_minus_HD = param_with_axes(model, "v_minus_bias", (H, Dh), ("heads", "kv"),
                                     nn.initializers.normal(cfg.init_std))
    mem_valid_BM = lamemo.valid_mask(state)
    mem_BMD = nn.Dropout(cfg.dropout)(state["emb"].astype(h_BND.dtype), deterministic=deterministic)
    outputs = ([], [], [], [])  # per range: refreshed C', logS', this segment's a, logZ [n, ...]
    for a, b in scan_runs(cfg):
        if b - a > 1:  # identical layers as one scan (every one but the last computes its memory rows)
            def body(layer, carry, xs, shared):
                (h_BND, mem_BMD), (C_BMHD, logS_BMH) = carry, xs
                h_BND, mem_BMD, *rest = layer(h_BND, mem_BMD, shared[0], C_BMHD, logS_BMH, *shared[1:], deterministic)
                return (h_BND, mem_BMD), tuple(rest)

            (h_BND, mem_BMD), ys = scan_run(
                LaMemoLayer, cfg, a, b, body, (h_BND, mem_BMD), (state["C"][a:b], state["logS"][a:b]),
                (mem_valid_BM, u_HD, v_HD, v_minus_HD, num_valid_B), memory_output=True)
        else:
            needed = a < cfg.num_layers - 1 or model.last_memory_output
            h_BND, mem_BMD, *ys = layer_class(LaMemoLayer, cfg)(cfg, memory_output=needed, name=run_name(a, b))(
                h_BND, mem_BMD, mem_valid_BM, state["C"][a], state["logS"][a], u_HD, v_HD, v_minus_HD,
                num_valid_B, deterministic)
            ys = [y[None] for y in ys]
        for out, y in zip(outputs, ys):
            out.append(y)
    refreshed_C, refreshed_logS, cur_C, cur_logZ = (jnp.concatenate(out) for out in outputs)
    state = lamemo.write(state, emb_BND, refreshed_C, refreshed_logS, cur_C, cur_logZ, num_valid_B)
    return StackOutput(h_BND, state)
