"""What a memory kind is: its contract (two Protocols) and its registry entry (`MemoryKind`).

A kind is a package `memtx/memory/<kind>/`:

  options.py  its config section `model.<kind>` (a dataclass with `check(model, data)` and
              `describe()`), if it has options; no JAX, so that the config validates without it
  state.py    its memory as pure functions over a pytree (`MemoryState`)
  layers.py   its layer stack, which runs every layer and writes the memory (`MemoryLayers`)
  __init__.py `KIND = MemoryKind(...)`, which memtx/memory/registry.py lists

The model, the steps, checkpoints, `memtx.fit`, the studies and generation call only what the
Protocols name, and the contract test (tests/test_memory_contract.py) checks every registered
kind against them. The kNN memory is not a kind: it is an add-on that the kinds with `knn=True`
carry in their layers (`knn_stores` below). No JAX is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax

    from memtx.config import ModelConfig


@runtime_checkable
class MemoryState(Protocol):
    """A kind's state module. Every leaf has a leading batch axis or a leading `layers` axis then
    the batch axis; rows are documents and never mix. Its bytes are those of `init_for`'s
    abstract value (`jax.eval_shape`): model_memory.state_bytes."""

    # Leaf name -> logical axis names, one per dimension (sharding rules map them to the mesh).
    LOGICAL_AXES: Mapping[str, tuple]

    def init_for(self, cfg: ModelConfig, batch_size: int) -> dict:
        """The empty memory of `batch_size` rows."""

    def reset_rows(self, state: dict, reset_B: jax.Array) -> dict:
        """Empties the rows whose flag is set (a document starts there); O(B), not O(memory)."""

    def valid_mask(self, state: dict) -> jax.Array:
        """[B, slots] bool: the slots the layers attend (the studies measure distances over them)."""

    def attended_rows(self, cfg: ModelConfig, seq_len: int) -> int:
        """Keys each query of a segment attends to in a layer (memtx.fit, memtx.flops)."""

    def extra_activation_bytes(self, cfg: ModelConfig, batch: int, seq_len: int) -> int:
        """Per layer, what the train step keeps beyond an XL layer's (memtx.fit's estimate)."""


@dataclass(frozen=True)
class Segment:
    """What the model gives a kind's stack besides its state: one segment, embedded. The add-on
    and decoding fields are set only for the kinds whose registry entry says they carry them
    (`knn`, `kv_cache`); a stack of another kind never sees them."""

    h_BND: jax.Array  # the embedded tokens (after dropout)
    emb_BND: jax.Array  # the scaled embeddings (LaMemo stores them)
    num_valid_B: jax.Array  # real positions of each row, a prefix: padding is never written
    u_HD: jax.Array  # Transformer-XL's shared content bias
    v_HD: jax.Array  # ... and position bias
    deterministic: bool  # no dropout
    knn_stores: dict | None = None  # kinds with `knn`: the kNN add-on's stores (memtx/memory/knn_add_on.py)
    cache: Any = None  # kinds with `kv_cache`, in generation: each layer's attention cache
    position: Any = None  # ... and the segment position of the new rows (h_BND) in it


@dataclass(frozen=True)
class StackOutput:
    h_BND: jax.Array  # the last layer's output
    state: dict  # the new state (unchanged with a cache: generation writes whole segments)
    knn_stores: dict | None = None  # kinds with `knn`: the stores after the segment
    cache: Any = None  # kinds with `kv_cache`: each layer's attention cache of [memory ; segment]


@runtime_checkable
class MemoryLayers(Protocol):
    """A kind's layer module."""

    def stack(self, model: Any, segment: Segment, state: dict) -> StackOutput:
        """Runs every layer of `model` (the Flax LM, whose parameters the layers create) on the
        segment and writes the state. With `segment.cache` (generation) the inputs are the
        tokens at segment positions `segment.position`.. and the state is returned unchanged. A
        kind's own loss is sown as ("losses", name) and added by the train step."""

    def scan_runs(self, cfg: ModelConfig) -> list[tuple[int, int]]:
        """Its layers as consecutive ranges [a, b) covering 0..L; with `model.scan_layers` a range
        of identical layers runs as one scan (memtx/layers.py)."""


@dataclass(frozen=True)
class MemoryKind:
    name: str  # the value of `model.memory`, and its options' section: `model.<name>`
    label: str  # how tables and plots name it
    load: Callable[[], tuple[MemoryState, MemoryLayers]]  # imports its state and layers (JAX): when first used
    options: type | None = None  # its config section's dataclass (options.py), valid with this kind only
    knn: bool = True  # can carry the kNN memory (`model.knn`) in its layers
    kv_cache: bool = True  # generation may run one token at a time with a key/value cache
    qk_norm: bool = True  # `model.qk_norm` applies to its attention
    refreshes: bool = False  # its memory slots are recomputed from each segment (LaMemo's look-ahead)
    whole_segment: bool = True  # every layer's queries are the whole segment over [memory ; segment]
    smeared_keys: bool = False  # `model.smeared_keys` applies (its memory rows are consecutive positions)
    # Its options at sizes that fit the tests' tiny models (2 layers, segments of 6 or 16 positions),
    # with which the contract test runs it.
    small_options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def state(self) -> MemoryState:
        return self.load()[0]

    @property
    def layers(self) -> MemoryLayers:
        return self.load()[1]

    def section(self, model_cfg) -> Any:
        """Its options in a ModelConfig (None for a kind without options)."""
        return getattr(model_cfg, self.name) if self.options else None
