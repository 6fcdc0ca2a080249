"""The Block-Recurrent Transformer (Hutchins et al. 2022): blocks attend over a sliding window,
and one layer carries a recurrent state from block to block, updated by gates. Carries no kNN
memory and no key/value cache.

options.py: `model.block_recurrent`; state.py: the XL memory, the recurrent state, block counts;
layers.py: the recurrent layer (state attention, gates) and the block-wise stack.
"""

from memtx.memory.block_recurrent.options import BlockRecurrentConfig
from memtx.memory.kind import MemoryKind


def _load():
    from memtx.memory.block_recurrent import layers, state
    return state, layers


KIND = MemoryKind("block_recurrent", "Block-Recurrent", _load, options=BlockRecurrentConfig, knn=False,
                  kv_cache=False, qk_norm=False, whole_segment=False,
                  small_options={"block_len": 2, "state_size": 3, "layer": -1})
