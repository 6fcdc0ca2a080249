"""Transformer-XL (and Transformer+RPE with model.mem_len=0) on long documents.

Presets:
  cpu      (default) small byte-level model on the embedded stdlib corpus; ~3-4 min on 2 CPU cores
  cpu_rpe  the same model without memory (M = 0): Transformer+RPE, the baseline of both papers
  cpu_qk   the same with normalised q/k in every layer: the baseline of configs/knn.py:cpu
  wt103    the LaMemo paper's WikiText-103 base baseline: 16 layers, d 410, 10 x 41, FFN 2100,
           segment = memory = 150, dropout 0.1, Adam 2.5e-4 cosine to 0, no warmup, batch 64, 250K steps
  enwik8   the LaMemo paper's enwik8/text8 baseline: 12 layers, d 512, 8 x 64, FFN 2048,
           segment = memory = 512, batch 40, 100K steps (text8 uses the same model)
"""

from memtx.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def cpu() -> Config:
    return Config(
        name="txl_cpu",
        model=ModelConfig(num_layers=4, d_model=128, num_heads=4, d_ff=512, mem_len=64, dropout=0.0),
        data=DataConfig(corpus="stdlib", seq_len=64, batch_size=8, eval_batch_size=8),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=200, clip_norm=0.25),
        train=TrainConfig(steps=2500, log_every=100, checkpoint_every=500))


def cpu_rpe() -> Config:
    cfg = cpu()
    cfg.name, cfg.model.mem_len = "rpe_cpu", 0
    return cfg


def cpu_qk() -> Config:
    """The cpu model with L2-normalised q/k and a learned scale in every layer: the baseline of
    configs/knn.py:cpu, which differs from it in the kNN memory alone."""
    cfg = cpu()
    cfg.name, cfg.model.qk_norm = "txl_cpu_qk", True
    return cfg


def wt103() -> Config:
    # Word-level WikiText-103 needs its own vocabulary (issue: data at scale); the model and
    # optimisation follow the paper's base setting. Byte-level corpora work as is.
    return Config(
        name="txl_wt103_base",
        model=ModelConfig(num_layers=16, d_model=410, num_heads=10, head_dim=41, d_ff=2100, mem_len=150,
                          dropout=0.1, pre_norm=False),
        data=DataConfig(seq_len=150, batch_size=64, eval_batch_size=16),
        optim=OptimConfig(learning_rate=2.5e-4, warmup_steps=0, clip_norm=0.25),
        train=TrainConfig(steps=250_000, log_every=200, checkpoint_every=4000))


def enwik8() -> Config:
    return Config(
        name="txl_enwik8",
        model=ModelConfig(num_layers=12, d_model=512, num_heads=8, head_dim=64, d_ff=2048, mem_len=512,
                          dropout=0.1, pre_norm=False),
        data=DataConfig(seq_len=512, batch_size=40, eval_batch_size=8),
        optim=OptimConfig(learning_rate=2.5e-4, warmup_steps=0, clip_norm=0.25),
        train=TrainConfig(steps=100_000, log_every=200, checkpoint_every=4000))


PRESETS = {"cpu": cpu, "cpu_rpe": cpu_rpe, "cpu_qk": cpu_qk, "wt103": wt103, "enwik8": enwik8, "text8": enwik8}


def get_config(preset: str = "cpu") -> Config:
    return PRESETS[preset]()
