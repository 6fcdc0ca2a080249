"""Block-Recurrent Transformer (Hutchins et al. 2022): sliding-window blocks with one recurrent
layer carrying a state of S vectors from block to block (memtx/memory/block_recurrent/layers.py).

Presets:
  cpu      (default) the configs/txl.py cpu model (4 layers, d 128, segments of 64) cut into 2
           blocks of 32; each block attends over the 64 positions before it (the txl model's
           memory length) and itself; 32 state vectors in layer 1 (-3), fixed gates
  cpu_lstm the same with LSTM gates
  pg19     the shape of the paper's PG-19 models as the official code's configs give it: 12
           layers, d 1024, 8 heads of 128, FFN 4096, blocks of 512 with a window of 512, 512
           state vectors in layer -3, dropout 0.05, segments of 4096, a 32k vocabulary. Point it
           at PG-19 with --config.data.task=pg19 --config.data.data_dir=... --config.data.vocab=...
           (README: data at scale). The optimiser and batch are memtx's choices, not the paper's.
"""

import os

from memtx.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config_file

_TXL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "txl.py")


def _cpu(name: str, gate: str) -> Config:
    cfg = load_config_file(f"{_TXL}:cpu")  # the same model, optimiser and data
    cfg.name = name
    cfg.model.memory = "block_recurrent"
    b = cfg.model.block_recurrent
    b.block_len, b.state_size, b.layer, b.gate = 32, 32, -3, gate
    return cfg


def pg19() -> Config:
    cfg = Config(
        name="block_recurrent_pg19",
        model=ModelConfig(num_layers=12, d_model=1024, num_heads=8, head_dim=128, d_ff=4096, mem_len=512,
                          vocab_size=32000, dropout=0.05, attn_dropout=0.05, pre_norm=True, memory="block_recurrent"),
        data=DataConfig(seq_len=4096, batch_size=32, eval_batch_size=8),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1000, clip_norm=0.25),
        train=TrainConfig(steps=500_000, log_every=200, checkpoint_every=4000))
    b = cfg.model.block_recurrent
    b.block_len, b.state_size, b.layer, b.gate = 512, 512, -3, "fixed"
    return cfg


PRESETS = {
    "cpu": lambda: _cpu("block_recurrent_cpu", "fixed"),
    "cpu_lstm": lambda: _cpu("block_recurrent_cpu_lstm", "lstm"),
    "pg19": pg19,
}


def get_config(preset: str = "cpu") -> Config:
    return PRESETS[preset]()
