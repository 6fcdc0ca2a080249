"""The memory kinds memtx knows: `model.memory` names one of them.

Each kind is a package `memtx/memory/<kind>/` (its options, state and layers; the contract is
memtx/memory/kind.py) whose `KIND` is listed here once. The model, the steps, checkpoints,
`memtx.fit`, the studies and generation ask this table, and the config takes each kind's options
section from it (`model.<kind>`); nothing else in the package compares memory names. Importing
this module imports no JAX: a kind's state and layers load when first used.

Adding a kind is its package and one line below (docs/adding_a_memory.md).
"""

from __future__ import annotations

from dataclasses import field

from memtx.memory import block_recurrent, compressive, lamemo, xl
from memtx.memory.kind import MemoryKind

KINDS: dict[str, MemoryKind] = {}


def register(kind: MemoryKind) -> MemoryKind:
    """Adds a kind (the list below; a test or a user's script may add one more at run time: a
    kind with options must be registered before memtx.config is imported to get its section)."""
    if kind.name in KINDS:
        raise ValueError(f"memory kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind
    return kind


for _kind in (xl.KIND, lamemo.KIND, compressive.KIND, block_recurrent.KIND):
    register(_kind)


def describe(model_cfg, with_add_ons: bool = True) -> str:
    """The memory a model has, in words: "XL memory 128, kNN memory 8192" (the add-ons' part:
    memtx/memory/add_ons.py)."""
    kind, m = of(model_cfg), model_cfg
    text = f"{kind.label} memory {m.mem_len}"
    if kind.options:
        text += kind.section(m).describe()
    if with_add_ons:
        from memtx.memory import add_ons  # imports JAX: not when the config validates

        text += add_ons.describe(m)
    return text


def get(name: str) -> MemoryKind:
    """The kind named `name`; a KeyError names the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown memory kind '{name}' (one of {', '.join(KINDS)})") from None


def of(model_cfg) -> MemoryKind:
    """The kind a ModelConfig uses."""
    return get(model_cfg.memory)


def sections(cls: type) -> type:
    """Class decorator for ModelConfig (before @dataclass): one field per kind with options,
    `model.<kind>`, holding its defaults. The config module names no kind."""
    for kind in KINDS.values():
        if kind.options:
            cls.__annotations__[kind.name] = kind.options
            setattr(cls, kind.name, field(default_factory=kind.options))
    return cls

