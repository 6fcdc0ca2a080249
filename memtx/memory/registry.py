"""The memory kinds memtx knows: `model.memory` names one of them.

A kind is a state module (pure functions over its pytree: `init_for(cfg, batch_size)`,
`reset_rows(state, reset_B)`, `valid_mask(state)` (the slots the layers attend, [B, slots]),
`LOGICAL_AXES`, `bytes_for(cfg, batch_size)`) and a layer stack
(`stack(model, h_BND, emb_BND, state, knn_stores, num_valid_B, u_HD, v_HD, deterministic, cache,
position) -> (h_BND, state, knn_stores, cache)`, which runs every layer and writes the memories,
and `scan_runs(cfg)`, its layer ranges for `model.scan_layers`),
registered here once. The model, the steps, checkpoints, `memtx.fit`, the studies and generation
ask this table; nothing else in the package compares memory names. Adding a kind is one state
file, one layer file and one entry below.

The modules are named, not imported: `memtx.config` reads this table to validate a config
without importing JAX or Flax.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class MemoryKind:
    name: str  # the value of `model.memory`
    label: str  # how tables and plots name it
    state_module: str  # the state's pure functions
    layer_module: str  # its `stack` (and its layers)
    options: str | None = None  # its ModelConfig section (check(model, data), describe()), valid with it only
    knn: bool = True  # can carry the kNN memory (`model.knn`) in its layers
    kv_cache: bool = True  # generation may run one token at a time with a key/value cache
    qk_norm: bool = True  # `model.qk_norm` applies to its attention
    refreshes: bool = False  # its memory slots are recomputed from each segment (LaMemo's look-ahead)
    whole_segment: bool = True  # every layer's queries are the whole segment over [memory ; segment]
    smeared_keys: bool = False  # `model.smeared_keys` applies (its memory rows are consecutive positions)

    @property
    def state(self) -> ModuleType:
        return importlib.import_module(self.state_module)

    @property
    def layers(self) -> ModuleType:
        return importlib.import_module(self.layer_module)


KINDS: dict[str, MemoryKind] = {}


def register(kind: MemoryKind) -> MemoryKind:
    if kind.name in KINDS:
        raise ValueError(f"memory kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind
    return kind


register(MemoryKind("xl", "XL", "memtx.memory.xl", "memtx.xl_layer", smeared_keys=True))
register(MemoryKind("lamemo", "LaMemo", "memtx.memory.lamemo", "memtx.lamemo_layer", options="lamemo", knn=False,
                    kv_cache=False, qk_norm=False, refreshes=True))
register(MemoryKind("compressive", "Compressive", "memtx.memory.compressive", "memtx.compressive_layer",
                    options="compressive"))
register(MemoryKind("block_recurrent", "Block-Recurrent", "memtx.memory.block_recurrent",
                    "memtx.block_recurrent_layer", options="block_recurrent", knn=False, kv_cache=False, qk_norm=False,
                    whole_segment=False))


def describe(model_cfg, with_knn: bool = True) -> str:
    """The memory a model has, in words: "XL memory 128, kNN memory 8192"."""
    kind, m = of(model_cfg), model_cfg
    text = f"{kind.label} memory {m.mem_len}"
    if kind.options:
        text += getattr(m, kind.options).describe()
    return text + (f", kNN memory {m.knn.size}" if with_knn and m.knn.enabled else "")


def get(name: str) -> MemoryKind:
    """The kind named `name`; a KeyError names the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown memory kind '{name}' (one of {', '.join(KINDS)})") from None


def of(model_cfg) -> MemoryKind:
    """The kind a ModelConfig uses."""
    return get(model_cfg.memory)
