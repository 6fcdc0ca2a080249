"""Compressive Transformer (Rae et al. 2020): Transformer-XL with a compressed memory fed by the
slots the memory evicts (memtx/memory/compressive/layers.py), at the sizes of the presets it is compared
with; a baseline of the LaMemo paper.

Presets (each the configs/txl.py preset of the same name with the compressed memory added):
  cpu      (default) the small byte-level model: memory 64 + 64 compressed slots at rate 2 (reach
           64 + 128 tokens), a 1-D convolution trained by the attention-reconstruction loss
  cpu_mean the same with mean-pooling (no compression parameters, no auxiliary loss)
  wt103    the LaMemo paper's WikiText-103 base sizes: memory 150 + 150 compressed at rate 3
  enwik8   the paper's enwik8/text8 sizes: memory 512 + 512 compressed at rate 2 (512 is not a
           multiple of 3)
The compressed sizes and rates are memtx's choices at these sizes, not a paper's table.
"""

import os

from memtx.config import Config, load_config_file

_TXL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "txl.py")


def _compressive(txl_preset: str, name: str, size: int, rate: int, function: str = "conv") -> Config:
    cfg = load_config_file(f"{_TXL}:{txl_preset}")  # the same model, optimiser and data
    cfg.name = name
    cfg.model.memory = "compressive"
    cfg.model.compressive.size, cfg.model.compressive.rate = size, rate
    cfg.model.compressive.function = function
    return cfg


PRESETS = {
    "cpu": lambda: _compressive("cpu", "compressive_cpu", 64, 2),
    "cpu_mean": lambda: _compressive("cpu", "compressive_cpu_mean", 64, 2, "mean"),
    "wt103": lambda: _compressive("wt103", "compressive_wt103_base", 150, 3),
    "enwik8": lambda: _compressive("enwik8", "compressive_enwik8", 512, 2),
}
PRESETS["text8"] = PRESETS["enwik8"]


def get_config(preset: str = "cpu") -> Config:
    return PRESETS[preset]()
