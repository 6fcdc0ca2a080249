"""Small configs and corpora shared by the tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from memtx.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def tiny_config(corpus: str = "stdlib", mesh_shape=(2, 2, 2), **train) -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, mem_len=16),
        data=DataConfig(corpus=corpus, seq_len=16, batch_size=4, eval_batch_size=4, split_fractions=(1, 0, 0)),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        train=TrainConfig(**{"steps": 12, "log_every": 1, "checkpoint_every": 3, **train}),
        mesh=MeshConfig(shape=mesh_shape))


def make_corpus(directory: Path, num_docs: int = 6, max_bytes: int = 3000) -> Path:
    """A few real long documents: slices of the interpreter's own standard library source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = ["json/decoder.py", "textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py",
               "keyword.py", "shlex.py"]
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(sources[:num_docs]):
        data = (stdlib / name).read_bytes()[: max_bytes - 300 * i]  # varied lengths
        (directory / f"doc{i}.py").write_bytes(data)
    return directory
