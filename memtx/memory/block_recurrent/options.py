"""The Block-Recurrent Transformer's options: the config section `model.block_recurrent`, valid
with `model.memory=block_recurrent` only. No JAX here: the config validates it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from memtx.config_schema import bounded
from memtx.errors import ConfigError

if TYPE_CHECKING:
    from memtx.config import DataConfig, ModelConfig


@dataclass
class BlockRecurrentConfig:
    """The Block-Recurrent Transformer (Hutchins et al. 2022): the segment is cut into blocks of
    `block_len`, every layer's block attends over itself and the `model.mem_len` positions before
    it (the paper's sliding window: mem_len = block_len), and one layer also carries `state_size`
    state vectors from block to block, updated by gates (memtx/memory/block_recurrent/layers.py)."""

    block_len: int = bounded(32, gt=0)  # W: tokens per block; the state is updated once per block
    state_size: int = bounded(32, gt=0)  # S: state vectors
    layer: int = -3  # the recurrent layer, Python-style (meliad's recurrent_layer_indices = (-3,))
    gate: Literal["fixed", "lstm"] = "fixed"  # fixed: c*g + z*(1-g), g = sigmoid(bias) | lstm: input and forget gates
    skip_ffn: bool = False  # True: the state has no FFN, one gate after the attention (the paper's "skip")

    def check(self, m: ModelConfig, d: DataConfig) -> None:
        """ConfigError for what its fields' declarations cannot say (with model.memory "block_recurrent")."""
        if not -m.num_layers <= self.layer < m.num_layers:
            raise ConfigError(f"config key 'model.block_recurrent.layer' must index one of the {m.num_layers} "
                              f"layers (-{m.num_layers}..{m.num_layers - 1}), got {self.layer}")
        if d.seq_len % self.block_len:
            raise ConfigError(f"config key 'model.block_recurrent.block_len' ({self.block_len}) must divide "
                              f"data.seq_len ({d.seq_len})")

    def describe(self) -> str:
        return (f" + {self.state_size} state vectors in layer {self.layer} (blocks of {self.block_len}, "
                f"{self.gate} gates{', no state FFN' if self.skip_ffn else ''})")
