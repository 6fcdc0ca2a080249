"""LaMemo: look-ahead memory (spec §2), at the sizes of the Transformer-XL presets it is compared with.

Presets:
  cpu      (default) the small byte-level model of configs/txl.py:cpu with LaMemo's memory
  wt103    the LaMemo paper's WikiText-103 base: 16 layers, d 410, 10 x 41, FFN 2100,
           segment = memory = 150, dropout 0.1, Adam 2.5e-4 cosine to 0, no warmup, clip 0.25
  enwik8   the paper's enwik8/text8 setting: 12 layers, d 512, 8 x 64, FFN 2048,
           segment = memory = 512 (text8 uses the same model)

Until word-level WikiText-103 data exists (the data-at-scale issue) wt103 trains on bytes, so it
leaves the adaptive embedding off; with a word vocabulary add
`--config.model.adaptive_cutoffs=20000,40000,200000 --config.model.adaptive_div_val=4` (the
paper's WikiText-103 values).
"""

import os

from memtx.config import Config, load_config_file

_TXL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "txl.py")


def _lamemo(txl_preset: str, name: str) -> Config:
    cfg = load_config_file(f"{_TXL}:{txl_preset}")  # the same model, optimiser and data
    cfg.name = name
    cfg.model.memory_type = "lamemo"
    return cfg


def cpu() -> Config:
    return _lamemo("cpu", "lamemo_cpu")


def wt103() -> Config:
    return _lamemo("wt103", "lamemo_wt103_base")


def enwik8() -> Config:
    return _lamemo("enwik8", "lamemo_enwik8")


PRESETS = {"cpu": cpu, "wt103": wt103, "enwik8": enwik8, "text8": enwik8}


def get_config(preset: str = "cpu") -> Config:
    return PRESETS[preset]()
