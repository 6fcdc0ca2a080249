"""Top memory: a worked example of a memory kind (docs/adding_a_memory.md).

Every layer attends over [memory ; segment], where the memory is a sliding window of the *top*
layer's last `model.mem_len` outputs (an XL memory keeps each layer's own inputs instead). It
reuses the XL layer and carries the kNN memory; it has no options of its own.

Not registered by default: `memtx.memory.registry.register(KIND)` (or one line in the registry's
list) makes `model.memory=top_memory` a model like any other.
"""

from memtx.memory.kind import MemoryKind


def _load():
    from examples.top_memory import layers, state
    return state, layers


KIND = MemoryKind("top_memory", "Top memory", _load, kv_cache=False)
