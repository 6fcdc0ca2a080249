"""Transformer-XL recurrence (spec §1): each layer attends over the last `model.mem_len` inputs
of that layer and the segment; `model.mem_len=0` is Transformer+RPE. Carries the kNN memory.

state.py: the memory (every layer's last M inputs); layers.py: the XL layer and stack, which the
other kinds' stacks build on.
"""

from memtx.memory.kind import MemoryKind


def _load():
    from memtx.memory.xl import layers, state
    return state, layers


KIND = MemoryKind("xl", "XL", _load, smeared_keys=True)
