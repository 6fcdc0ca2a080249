"""The Block-Recurrent Transformer's layer stack (Hutchins et al. 2022).

A segment of N positions is cut into blocks of W (`model.block_recurrent.block_len`). Every layer
is a Transformer-XL layer whose block attends over itself (causally) and the M positions before
the block: the previous blocks of the segment, and before the first block the XL memory of the
last segment (M = W is the paper's sliding window). One layer (`block_recurrent.layer`) is also
recurrent: S state vectors c, carried from block to block and from segment to segment.

Per block t of the recurrent layer, with x the block's token rows (normalised when pre-LN) and
c_t the state the block reads:

  vertical (tokens)     out = x + W_o [self-attention over the window ; cross-attention to c_t]
                        then the FFN, as any layer: the block's tokens read the state of the
                        blocks before it, never their own
  horizontal (state)    s = LN(c_t) + P (learned positions of the S vectors)
                        h = W_s [self-attention of s over s ; cross-attention of s over the
                              block's token keys and values (the self-attention's, shared)]
                        c' = gate(c_t, h);  c_{t+1} = gate(c', FFN(LN(c')))  (`skip_ffn`: c' alone)

with gates in place of residual connections: `fixed`, g = sigmoid(b_g) per dimension and
c_new = c * g + (W_z h + b_z) * (1 - g); or `lstm`, c_new = c * sigmoid(W_f h + b_f + 1) +
tanh(W_z h + b_z) * sigmoid(W_i h + b_i - 1). The state and the token keys and values are
computed once per block and serve both directions. A document's first block reads a learned
initial state; a block with no valid position leaves the state as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from memtx.attention import RelativeAttention, dot_product_attention, param_with_axes
from memtx.layers import FeedForward, LayerNorm, layer_class, layer_parts, layer_runs, run_name, scan_run
from memtx.memory.block_recurrent import state as block_recurrent
from memtx.memory.kind import Segment, StackOutput
from memtx.memory.xl import state as xl
from memtx.memory.xl.layers import XLLayer

if TYPE_CHECKING:  # annotations only: the config imports the memory registry, which loads this
    from memtx.config import ModelConfig


class Gate(nn.Module):
    """The recurrent state's update in place of a residual connection (module docstring)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, c_BSD, h_BSD):
        cfg, D = self.cfg, self.cfg.d_model
        init = nn.initializers.normal(cfg.init_std)
        h = h_BSD.astype(jnp.float32)
        if cfg.block_recurrent.gate == "fixed":
            w_z = param_with_axes(self, "z", (D, D), ("embed", None), init)
            b_z = param_with_axes(self, "z_bias", (D,), (None,), nn.initializers.zeros)
            b_g = param_with_axes(self, "gate_bias", (D,), (None,), nn.initializers.zeros)
            g = jax.nn.sigmoid(b_g)
            new = c_BSD.astype(jnp.float32) * g + (h @ w_z + b_z) * (1 - g)
        else:  # lstm
            w = param_with_axes(self, "kernel", (D, 3, D), ("embed", None, None), init)
            b = param_with_axes(self, "bias", (3, D), (None, None), nn.initializers.zeros)
            z, i, f = (jnp.einsum("bsd,de->bse", h, w[:, j]) + b[j] for j in range(3))
            new = c_BSD.astype(jnp.float32) * jax.nn.sigmoid(f + 1) + jnp.tanh(z) * jax.nn.sigmoid(i - 1)
        return new.astype(c_BSD.dtype)


class BlockRecurrentLayer(nn.Module):
    """An XL layer over blocks that also reads and updates the recurrent state."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BND, mem_BMD, mem_valid_BM, u_HD, v_HD, deterministic, memory, valid_RBW):
        """h: the blocks as rows, [R * B, W, D] (block-major: row r * B + b is block r of batch
        row b); mem / mem_valid: each block's window; memory: the Block-Recurrent state (its
        recurrent state is read); valid_RBW: which block positions are real tokens.
        Returns (output, the state after the last block)."""
        cfg = self.cfg
        H, Dh, D, S = cfg.num_heads, cfg.dim_per_head, cfg.d_model, cfg.block_recurrent.state_size
        R, B, W = valid_RBW.shape
        M = mem_BMD.shape[1]
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        attn = RelativeAttention(cfg, name="attn")
        ffn, attn_norm, ffn_norm, drop = layer_parts(cfg)
        x_BND = attn_norm(h_BND) if cfg.pre_norm else h_BND
        mem_in_BMD = attn_norm(mem_BMD) if cfg.pre_norm else mem_BMD
        a_self_BND, kv = attn(x_BND, mem_in_BMD, mem_valid_BM, u_HD, v_HD, deterministic)
        token_k_RBWHD = kv["k"][:, M:].reshape(R, B, W, H, Dh)
        token_v_RBWHD = kv["v"][:, M:].reshape(R, B, W, H, Dh)

        initial_SD = param_with_axes(self, "initial_state", (S, D), (None, "embed"), init)
        position_SD = param_with_axes(self, "state_position", (S, D), (None, "embed"), init)
        # [D, 4, H, Dh]: the state's self-attention query, cross-attention query, key, value
        w_state = param_with_axes(self, "state_qkv", (D, 4, H, Dh), ("embed", None, "heads", "kv"), init).astype(dtype)
        w_state_out = param_with_axes(self, "state_out", (2, H, Dh, D), (None, "heads", "kv", "embed"), init).astype(dtype)
        state_norm, gate_attn = LayerNorm(cfg.layer_norm_eps, name="state_norm"), Gate(cfg, name="gate_attn")
        if not cfg.block_recurrent.skip_ffn:
            state_ffn_norm, state_ffn = LayerNorm(cfg.layer_norm_eps, name="state_ffn_norm"), FeedForward(cfg, name="state_ffn")
            gate_ffn = Gate(cfg, name="gate_ffn")

        c_BSD = block_recurrent.read_state(memory, initial_SD)
        state_keys, state_values = [], []  # of the state each block reads
        for r in range(R):
            s_BSD = (state_norm(c_BSD) + position_SD).astype(dtype)
            q_self, q_cross, k_s, v_s = (jnp.einsum("bsd,dhe->bshe", s_BSD, w_state[:, j]) for j in range(4))
            state_keys.append(k_s)
            state_values.append(v_s)
            a_self = dot_product_attention(q_self, k_s, v_s)
            a_cross = dot_product_attention(q_cross, token_k_RBWHD[r], token_v_RBWHD[r], valid_RBW[r])
            h_BSD = (jnp.einsum("bshe,hed->bsd", a_self, w_state_out[0])
                     + jnp.einsum("bshe,hed->bsd", a_cross, w_state_out[1]))
            updated = gate_attn(c_BSD, h_BSD)
            if not cfg.block_recurrent.skip_ffn:
                updated = gate_ffn(updated, state_ffn(state_ffn_norm(updated), deterministic))
            c_BSD = jnp.where(valid_RBW[r].any(-1)[:, None, None], updated, c_BSD)

        # The tokens of block r read the state before it: state_keys[r], state_values[r].
        w_q = param_with_axes(self, "token_cross_q", (D, H, Dh), ("embed", "heads", "kv"), init).astype(dtype)
        w_o = param_with_axes(self, "token_cross_out", (H, Dh, D), ("heads", "kv", "embed"), init).astype(dtype)
        q_BNHD = jnp.einsum("bnd,dhe->bnhe", x_BND.astype(dtype), w_q)
        a_cross_BNHD = dot_product_attention(q_BNHD, jnp.concatenate(state_keys), jnp.concatenate(state_values))
        a_BND = a_self_BND + jnp.einsum("bnhe,hed->bnd", a_cross_BNHD, w_o)
        if cfg.pre_norm:
            h_BND = h_BND + drop(a_BND, deterministic=deterministic)
            h_BND = h_BND + drop(ffn(ffn_norm(h_BND), deterministic), deterministic=deterministic)
        else:
            h_BND = attn_norm(h_BND + drop(a_BND, deterministic=deterministic))
            h_BND = ffn_norm(h_BND + drop(ffn(h_BND, deterministic), deterministic=deterministic))
        self.sow("intermediates", "out", h_BND)
        return nn.with_logical_constraint(h_BND, ("act_batch", "act_seq", "act_embed")), c_BSD


def block_windows(mem_BMD, mem_valid_BM, h_BPD, W: int):
    """Each block's window, the M rows of [memory ; segment] before it, as block-major rows:
    ([R * B, M, D], [R * B, M])."""
    B, P, _ = h_BPD.shape
    M = mem_BMD.shape[1]
    rows = jnp.concatenate([mem_BMD.astype(h_BPD.dtype), h_BPD], axis=1)
    valid = jnp.concatenate([mem_valid_BM, jnp.ones((B, P), bool)], axis=1)
    starts = range(0, P, W)
    return (jnp.concatenate([rows[:, s:s + M] for s in starts]), jnp.concatenate([valid[:, s:s + M] for s in starts]))


def to_blocks(x_BP, W: int):
    """[B, R * W, ...] -> [R * B, W, ...] (block-major)."""
    B, P = x_BP.shape[:2]
    x = x_BP.reshape(B, P // W, W, *x_BP.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(P // W * B, W, *x_BP.shape[2:])


def from_blocks(x_RBW, B: int):
    """[R * B, W, ...] -> [B, R * W, ...]."""
    RB, W = x_RBW.shape[:2]
    x = jnp.swapaxes(x_RBW.reshape(RB // B, B, W, *x_RBW.shape[2:]), 0, 1)
    return x.reshape(B, RB // B * W, *x_RBW.shape[2:])


def recurrent_layer(cfg: ModelConfig) -> int:
    return cfg.block_recurrent.layer % cfg.num_layers


def scan_runs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The stack's layer ranges (layers.layer_runs): with `model.scan_layers` the recurrent layer
    runs alone and the XL layers before and after it as scans."""
    return layer_runs(cfg, (recurrent_layer(cfg),))


def stack(model, segment: Segment, state: dict) -> StackOutput:
    """Every layer over the segment's blocks (the recurrent one also over its state); then the XL
    memory and the state are written."""
    cfg = model.cfg
    h_BND, num_valid_B, u_HD, v_HD = segment.h_BND, segment.num_valid_B, segment.u_HD, segment.v_HD
    deterministic = segment.deterministic
    br = cfg.block_recurrent
    B, N, D = h_BND.shape
    W = br.block_len
    P = -(-N // W) * W  # a segment that is not a multiple of W gets padding positions (never valid)
    h_BPD = jnp.pad(h_BND, ((0, 0), (0, P - N), (0, 0)))
    valid_BP = jnp.arange(P)[None, :] < num_valid_B[:, None]
    valid_RBW = jnp.swapaxes(valid_BP.reshape(B, P // W, W), 0, 1)
    mem_valid_BM = xl.valid_mask(state)
    inputs, final_BSD = [], None
    for a, b in scan_runs(cfg):
        if b - a > 1:  # identical XL layers as one scan; each also returns its input
            def body(layer, h_BPD, mem_BMD, shared):
                mem_valid_BM, u_HD, v_HD = shared
                mem_RBMD, mem_valid_RBM = block_windows(mem_BMD, mem_valid_BM, h_BPD, W)
                blocks, _ = layer(to_blocks(h_BPD, W), mem_RBMD, mem_valid_RBM, u_HD, v_HD, deterministic)
                return from_blocks(blocks, B), h_BPD

            h_BPD, inputs_nBPD = scan_run(XLLayer, cfg, a, b, body, h_BPD, state["hidden"][a:b],
                                           (mem_valid_BM, u_HD, v_HD))
            inputs.append(inputs_nBPD)
            continue
        inputs.append(h_BPD[None])
        mem_RBMD, mem_valid_RBM = block_windows(state["hidden"][a], mem_valid_BM, h_BPD, W)
        blocks = to_blocks(h_BPD, W)
        if a == recurrent_layer(cfg):
            blocks, final_BSD = layer_class(BlockRecurrentLayer, cfg)(cfg, name=run_name(a, b))(
                blocks, mem_RBMD, mem_valid_RBM, u_HD, v_HD, deterministic, state, valid_RBW)
        else:
            blocks, _ = layer_class(XLLayer, cfg)(cfg, name=run_name(a, b))(blocks, mem_RBMD, mem_valid_RBM, u_HD, v_HD, deterministic)
        h_BPD = from_blocks(blocks, B)
    num_blocks_B = -(-num_valid_B // W)
    state = block_recurrent.write(state, jnp.concatenate(inputs)[:, :, :N], final_BSD, num_blocks_B, num_valid_B)
    return StackOutput(h_BPD[:, :N], state)
