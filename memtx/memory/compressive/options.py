"""The Compressive Transformer's options: the config section `model.compressive`, valid with
`model.memory=compressive` only. No JAX here: the config validates it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from memtx.config_schema import bounded
from memtx.errors import ConfigError

if TYPE_CHECKING:
    from memtx.config import DataConfig, ModelConfig


@dataclass
class CompressiveConfig:
    """The Compressive Transformer's compressed memory (Rae et al. 2020): each layer's slots that
    its FIFO memory (`model.mem_len`) evicts are compressed `rate` to one into `size` more slots,
    attended to like the memory, [compressed ; memory ; segment]."""

    size: int = bounded(64, ge=0)  # compressed slots per layer (n_cm; 0: evicted slots are dropped, as Transformer-XL)
    rate: int = bounded(2, gt=0)  # compression rate c (data.seq_len must be a multiple of it)
    function: Literal["conv", "mean"] = "conv"  # conv: 1-D convolution, kernel = stride = rate | mean: mean-pool
    # Weight of the attention-reconstruction loss, which alone trains the compression network
    # (its inputs and the attention weights are stop-gradient'ed, as in the paper).
    loss_weight: float = bounded(1.0, ge=0)

    def check(self, m: ModelConfig, d: DataConfig) -> None:
        """ConfigError for what its fields' declarations cannot say (with model.memory "compressive")."""
        if d.seq_len % self.rate:
            raise ConfigError(f"config key 'model.compressive.rate' ({self.rate}) must divide data.seq_len ({d.seq_len})")

    def describe(self) -> str:
        return f" + {self.size} compressed (rate {self.rate}, {self.function})"
