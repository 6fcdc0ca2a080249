"""LaMemo: look-ahead memory (spec §2), at the sizes of the Transformer-XL presets it is compared with.

Presets:
  cpu      (default) the small byte-level model of configs/txl.py:cpu with LaMemo's memory
  wt103    the LaMemo paper's WikiText-103 base: 16 layers, d 410, 10 x 41, FFN 2100,
           segment = memory = 150, dropout 0.1, Adam 2.5e-4 cosine to 0, no warmup, clip 0.25
  enwik8   the paper's enwik8/text8 setting: 12 layers, d 512, 8 x 64, FFN 2048,
           segment = memory = 512 (text8 uses the same model)

Any preset takes one of the paper's Table 3 ablations as a suffix, e.g. `wt103_no_look_ahead`:
  _no_interpolation   alpha = 0: a memory slot keeps only its latest look-ahead output
  _no_look_ahead      slots are never refreshed (the forward pass is Transformer-XL's)
  _xl_encoding        the look-ahead scored with Transformer-XL's relative encoding (signed
                      distance, the look-back bias v) instead of the disentangled one

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
    cfg.model.memory = "lamemo"
    return cfg


def cpu() -> Config:
    return _lamemo("cpu", "lamemo_cpu")


def wt103() -> Config:
    return _lamemo("wt103", "lamemo_wt103_base")


def enwik8() -> Config:
    return _lamemo("enwik8", "lamemo_enwik8")


PRESETS = {"cpu": cpu, "wt103": wt103, "enwik8": enwik8, "text8": enwik8}
ABLATIONS = {"no_interpolation": ("interpolation", False), "no_look_ahead": ("look_ahead", False),
             "xl_encoding": ("encoding", "xl")}


def get_config(preset: str = "cpu") -> Config:
    for ablation, (key, value) in ABLATIONS.items():
        if preset.endswith("_" + ablation):
            cfg = PRESETS[preset[: -len(ablation) - 1]]()
            cfg.name += "_" + ablation
            setattr(cfg.model.lamemo, key, value)
            return cfg
    return PRESETS[preset]()
