"""The Compressive Transformer (Rae et al. 2020): the XL memory plus, per layer, a compressed
memory of the slots it evicts, `rate` to one.

options.py: `model.compressive`; state.py: the FIFO memory, the compressed memory, eviction;
layers.py: the compression network, its reconstruction loss, the stack.
"""

from memtx.memory.compressive.options import CompressiveConfig
from memtx.memory.kind import MemoryKind


def _load():
    from memtx.memory.compressive import layers, state
    return state, layers


KIND = MemoryKind("compressive", "Compressive", _load, options=CompressiveConfig,
                  small_options={"size": 4, "rate": 2})
