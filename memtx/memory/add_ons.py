"""Memories that plug into a kind's layer stack beside its own memory: today the Memorizing
Transformer's kNN memory (memtx/memory/knn_add_on.py). The memory kinds with `knn=True` in the
registry carry it; the config refuses its options for the others in one line.

An add-on is a module that keeps the `AddOn` contract below: the state of each layer that has it
(pure functions, in the model's memory pytree under its `NAME`), and the hooks the rest of memtx
calls: what the train loop logs, what the eval step sums and evaluation reports, what memtx.fit
counts, and its words in the model line. The model memory, the steps, evaluation, training and
fit loop over ADD_ONS and never name one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from memtx.memory import knn_add_on

if TYPE_CHECKING:
    import jax

    from memtx.config import ModelConfig


@runtime_checkable
class AddOn(Protocol):
    NAME: str  # its key in the memory pytree: {"<kind>": ..., NAME: {"<layer>": state, ...}}
    LOGICAL_AXES: dict  # one layer's state: leaf name -> logical axis names

    def layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The layers that carry it (empty: off)."""

    def init_layer(self, cfg: ModelConfig, batch_size: int) -> dict:
        """One layer's empty state."""

    def reset_rows(self, state: dict, reset_B: jax.Array) -> dict:
        """One layer's state with the rows that start a document emptied."""

    def describe(self, cfg: ModelConfig) -> str:
        """Its part of the model line (", kNN memory 8192"), "" when off."""

    def train_metrics(self, cfg: ModelConfig, params, states: dict) -> dict:
        """Scalars the train loop logs at each report (host floats)."""

    def eval_sums(self, cfg: ModelConfig, intermediates, states: dict, scored_BN: jax.Array) -> dict:
        """A segment's sums (traced, inside the eval step), added up over the evaluation."""

    def eval_result(self, cfg: ModelConfig, params, sums: dict, tokens: float) -> dict:
        """The fields an evaluation result gets from the summed `eval_sums`."""

    def activation_bytes(self, cfg: ModelConfig, batch: int, seq_len: int) -> int:
        """What the train step keeps for it per device (memtx.fit's estimate)."""


ADD_ONS: tuple[Any, ...] = (knn_add_on,)
NAMES = frozenset(a.NAME for a in ADD_ONS)


def init(cfg: ModelConfig, batch_size: int) -> dict:
    """{NAME: {"<layer>": state}} for every add-on (an empty dict where it is off)."""
    return {a.NAME: {str(layer): a.init_layer(cfg, batch_size) for layer in a.layers(cfg)} for a in ADD_ONS}


def reset_rows(memory: dict, reset_B) -> dict:
    return {a.NAME: {layer: a.reset_rows(state, reset_B) for layer, state in memory[a.NAME].items()}
            for a in ADD_ONS}


def logical_axes(cfg: ModelConfig) -> dict:
    return {a.NAME: {str(layer): dict(a.LOGICAL_AXES) for layer in a.layers(cfg)} for a in ADD_ONS}


def describe(cfg: ModelConfig) -> str:
    return "".join(a.describe(cfg) for a in ADD_ONS)


def train_metrics(cfg: ModelConfig, params, memory: dict) -> dict:
    return {k: v for a in ADD_ONS for k, v in a.train_metrics(cfg, params, memory[a.NAME]).items()}


def eval_sums(cfg: ModelConfig, intermediates, memory: dict, scored_BN) -> dict:
    return {k: v for a in ADD_ONS for k, v in a.eval_sums(cfg, intermediates, memory[a.NAME], scored_BN).items()}


def eval_result(cfg: ModelConfig, params, sums: dict, tokens: float) -> dict:
    return {k: v for a in ADD_ONS for k, v in a.eval_result(cfg, params, sums, tokens).items()}


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    return sum(a.activation_bytes(cfg, batch, seq_len) for a in ADD_ONS)
