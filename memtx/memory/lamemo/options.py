"""LaMemo's options: the config section `model.lamemo`, valid with `model.memory=lamemo` only.
No JAX here: the config validates it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from memtx.errors import ConfigError

if TYPE_CHECKING:
    from memtx.config import DataConfig, ModelConfig


@dataclass
class LaMemoConfig:
    """LaMemo's parts (spec §2), each switchable off for the paper's Table 3 ablations."""

    interpolation: bool = True  # False: alpha = 0, a slot keeps only its latest look-ahead output
    look_ahead: bool = True  # False: slots are never refreshed (the Transformer-XL memory, recomputed)
    # disentangled: |i-j| and v_minus; xl: the signed distance p-j < 0 and v
    encoding: Literal["disentangled", "xl"] = "disentangled"

    def check(self, m: ModelConfig, d: DataConfig) -> None:
        """ConfigError for what its fields' declarations cannot say (with model.memory "lamemo")."""
        if m.query_block:  # its causal and look-ahead terms score the whole segment at once
            raise ConfigError(f"config key 'model.query_block' ({m.query_block}) does not apply with model.memory "
                              "'lamemo' (LaMemo's attention has no query blocks); set it to 0")

    def describe(self) -> str:
        return ""
