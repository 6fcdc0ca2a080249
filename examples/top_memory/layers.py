"""The top memory's stack: the XL layers, each reading the same memory rows."""

from __future__ import annotations

import jax.numpy as jnp

from examples.top_memory import state as top_state
from memtx.memory.kind import Segment, StackOutput
from memtx.memory.xl.layers import run_layers, scan_runs  # noqa: F401 - scan_runs: the XL stack's layer ranges


def stack(model, segment: Segment, state: dict) -> StackOutput:
    top_BMD = state["top"]
    mem_LBMD = jnp.broadcast_to(top_BMD[None], (model.cfg.num_layers, *top_BMD.shape))  # every layer, one memory
    h_BND, _, knn_stores, new_cache = run_layers(model, segment, mem_LBMD, top_state.valid_mask(state))
    if segment.cache is None:
        state = top_state.write(state, h_BND, segment.num_valid_B)
    return StackOutput(h_BND, state, knn_stores, new_cache)
