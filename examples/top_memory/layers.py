"""The top memory's stack: the XL layers, each reading the same memory rows."""

from __future__ import annotations

import jax.numpy as jnp

from examples.top_memory import state as top_state
from memtx.memory.xl.layers import run_layers, scan_runs  # noqa: F401 - scan_runs: the XL stack's layer ranges


def stack(model, h_BND, emb_BND, state, knn_stores, num_valid_B, u_HD, v_HD, deterministic, cache=None,
          position=None):
    top_BMD = state["top"]
    mem_LBMD = jnp.broadcast_to(top_BMD[None], (model.cfg.num_layers, *top_BMD.shape))  # every layer, one memory
    h_BND, _, knn_stores, new_cache = run_layers(model, h_BND, mem_LBMD, top_state.valid_mask(state), knn_stores,
                                                 num_valid_B, u_HD, v_HD, deterministic, cache, position)
    if cache is None:
        state = top_state.write(state, h_BND, num_valid_B)
    return h_BND, state, knn_stores, new_cache
