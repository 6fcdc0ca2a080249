"""Memorizing Transformer: a kNN memory in one layer (default: the 4th layer from the top), optional XL cache.

Presets mirror the structure of the paper's Table 4 (segment 512; kNN memory 1,536 / 8,192 /
65,536 / 262,144; with or without an XL cache of 512):
  paper_SIZE, paper_SIZE_xl   the paper's model size for accelerators: 12 layers, d 1024,
                              8 heads x 128, FFN 4096, k 32, memory at layer 8 (meliad: the 4th from the top)
  cpu_SIZE,   cpu_SIZE_xl     the same structure at CPU size (4 layers, d 128, segment 64)
  cpu                         (default) the small memorizing model of the default run:
                              the CPU Transformer-XL of configs/txl.py:cpu with normalised
                              q/k in every layer (model.qk_norm, as meliad) plus a 2,048-entry
                              kNN memory in layer 1
  (configs/txl.py:cpu_qk is its baseline without the memory: the two differ in the memory alone)
Memory size is not a parameter: evaluate any checkpoint at other sizes with
`python -m memtx.evaluate --workdir DIR --knn-sizes 0,1536,8192,65536`.
The optimiser settings of the paper presets are this project's defaults, not the paper's.
"""

import dataclasses

from memtx.config import Config, DataConfig, KNNConfig, ModelConfig, OptimConfig, TrainConfig

SIZES = (1536, 8192, 65536, 262144)


def paper(size: int, xl_cache: bool) -> Config:
    return Config(
        name=f"knn_paper_{size}{'_xl' if xl_cache else ''}",
        model=ModelConfig(num_layers=12, d_model=1024, num_heads=8, head_dim=128, d_ff=4096,
                          mem_len=512 if xl_cache else 0, pre_norm=True, dtype="bfloat16", qk_norm=True,
                          knn=KNNConfig(enabled=True, layers=(8,), size=size, k=32, backend="auto")),
        data=DataConfig(seq_len=512, batch_size=8, eval_batch_size=8),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=1000, clip_norm=0.25),
        train=TrainConfig(steps=500_000, log_every=200, checkpoint_every=5000))


def cpu_sized(size: int, xl_cache: bool) -> Config:
    return Config(
        name=f"knn_cpu_{size}{'_xl' if xl_cache else ''}",
        # meliad normalises q and k in every layer of its kNN models (qk_norm). The memory is in layer
        # 1: the default L-4 would be layer 0, whose keys carry nothing but the byte itself.
        model=ModelConfig(num_layers=4, d_model=128, num_heads=4, d_ff=512, mem_len=64 if xl_cache else 0,
                          qk_norm=True, knn=KNNConfig(enabled=True, layers=(1,), size=size, k=32, backend="auto")),
        data=DataConfig(seq_len=64, batch_size=8, eval_batch_size=8),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=200, clip_norm=0.25),
        train=TrainConfig(steps=2500, log_every=100, checkpoint_every=500))


def cpu() -> Config:
    cfg = cpu_sized(2048, xl_cache=True)
    return dataclasses.replace(cfg, name="knn_cpu")


PRESETS = {"cpu": cpu}
for _size in SIZES:
    PRESETS[f"paper_{_size}"] = lambda s=_size: paper(s, xl_cache=False)
    PRESETS[f"paper_{_size}_xl"] = lambda s=_size: paper(s, xl_cache=True)
    PRESETS[f"cpu_{_size}"] = lambda s=_size: cpu_sized(s, xl_cache=False)
    PRESETS[f"cpu_{_size}_xl"] = lambda s=_size: cpu_sized(s, xl_cache=True)


def get_config(preset: str = "cpu") -> Config:
    return PRESETS[preset]()
