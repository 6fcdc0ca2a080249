"""LaMemo, the look-ahead memory (spec §2): memory slots attend to the segment that follows and
are refreshed by interpolating with their past outputs. Carries no kNN memory and no key/value
cache (its memory is recomputed by each whole segment).

options.py: `model.lamemo`; state.py: embeddings, carried outputs and log-denominators;
layers.py: its attention (causal + look-ahead), layer and stack.
"""

from memtx.memory.kind import MemoryKind
from memtx.memory.lamemo.options import LaMemoConfig


def _load():
    from memtx.memory.lamemo import layers, state
    return state, layers


KIND = MemoryKind("lamemo", "LaMemo", _load, options=LaMemoConfig, knn=False, kv_cache=False, qk_norm=False,
                  refreshes=True)
