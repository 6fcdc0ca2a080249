"""Small configs and corpora shared by the tests."""

from __future__ import annotations

import contextlib
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from memtx.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from memtx.memory import registry


def kind_options(name: str) -> dict:
    """ModelConfig fields giving memory kind `name` small sizes that fit every test model (2
    layers, segments of 6 or 16): its options section with the kind's `small_options`, or nothing."""
    kind = registry.get(name)
    return {name: kind.options(**kind.small_options)} if kind.options else {}


def tiny_config(corpus: str = "stdlib", mesh_shape=(1, 1, 1), **train) -> Config:
    """Two layers of d 32 on one device (of the 8 the tests force); tests of sharding, and of the
    kill-and-resume path, pass mesh_shape=(2, 2, 2)."""
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


def small_model(**model):
    """(cfg, model, params) of a 2-layer d-16 model over a 40-token vocabulary, segments of 6,
    with `model` overriding ModelConfig fields; parameters perturbed from their initialisation
    (biases and gates away from 0) so every path carries signal."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from memtx.model import TransformerLM, init_memory

    cfg = ModelConfig(**{"vocab_size": 40, "vocab_pad_multiple": 8, "num_layers": 2, "d_model": 16, "num_heads": 2,
                         "d_ff": 32, "mem_len": 8, **model})
    lm = TransformerLM(cfg)
    params = lm.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                     jnp.full((2,), 6, jnp.int32))["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), nn.meta.unbox(params))
    return cfg, lm, params


def segment_batch(tokens, reset, weights=None) -> dict:
    """A segment batch of `small_model`'s vocabulary: targets are the inputs shifted by one id."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens + 1) % 40,
            "weights": jnp.ones(tokens.shape) if weights is None else jnp.asarray(weights, jnp.float32),
            "reset": jnp.asarray(reset)}


def random_batches(cfg, n, seed=0):
    """n training batches (numpy) of a 4-row config: random bytes; row 1's document ends inside
    every segment; all rows start documents in batch 0, row 1 again in batch 2."""
    rng = np.random.default_rng(seed)
    B, N = cfg.data.batch_size, cfg.data.seq_len
    for i in range(n):
        weights = np.ones((B, N), np.float32)
        weights[1, 5:] = 0  # a document ends mid-segment in row 1
        yield {"inputs": rng.integers(0, 256, (B, N), dtype=np.int32),
               "targets": rng.integers(0, 256, (B, N), dtype=np.int32),
               "weights": weights, "reset": np.array([i == 0, i in (0, 2), i == 0, i == 0])}


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (made if needed) with mount `options` ("size=2M", "size=1M,ro")
    for the block, unmounted after; the test is skipped where mounting needs a root it lacks."""
    path.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}; needs root): {mount.stderr.strip()[:120]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
