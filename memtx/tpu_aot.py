"""Compiling for TPU slices ahead of time, from a machine without TPUs (libtpu: memtx.fit.find_libtpu).

- `preset_names()`: every preset of configs/ (with LaMemo's Table 3 ablations of each);
- `reduced(cfg)`: the same structure (memory kind, layer roles, segment, memory and kNN sizes,
  backends, scan/remat) at a few layers of a narrow width, so that CI compiles every preset in
  seconds; the full shapes are benchmarks/tpu_estimate.py's;
- `variant(cfg, name)`: a preset with `model.scan_layers` and/or `model.remat` (VARIANTS), at
  enough layers that a run of identical layers is scanned;
- `compile_steps(cfg, kind, chips)`: the train and eval steps compiled for a slice;
- `analysis(compiled, kind)`: XLA's memory and cost analyses and a roofline step time.

tests/test_tpu_compile.py compiles every reduced preset for a v5e slice, and VARIANT_PRESETS for a v4
slice and in each variant for v5e;
benchmarks/tpu_estimate.py prints the paper presets' analyses at full size.
"""

from __future__ import annotations

import copy
import importlib.util
import os

from memtx import fit
from memtx.config import Config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Per chip (JAX's device on these): peak bf16 FLOP/s and HBM bandwidth, from Google's spec sheets.
CHIPS = {"v5e": {"flops": 197e12, "hbm_bytes_per_s": 819e9},
         "v4": {"flops": 275e12, "hbm_bytes_per_s": 1228e9},
         "v3": {"flops": 123e12, "hbm_bytes_per_s": 900e9}}


def _module(path: str):
    spec = importlib.util.spec_from_file_location(f"memtx_presets_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_names() -> list[str]:
    """'configs/FILE.py:PRESET' for every preset of every config file (and every ablation suffix
    a file declares in ABLATIONS, on each of its presets); an alias (text8 is enwik8's function)
    only once."""
    names = []
    for file in sorted(os.listdir(CONFIG_DIR)):
        if not file.endswith(".py"):
            continue
        module = _module(os.path.join(CONFIG_DIR, file))
        presets, seen = getattr(module, "PRESETS", {}), set()
        for preset, make in presets.items():
            if make in seen:
                continue
            seen.add(make)
            names.append(f"configs/{file}:{preset}")
            names += [f"configs/{file}:{preset}_{ablation}" for ablation in getattr(module, "ABLATIONS", {})]
    return names


def _moved(index: int, layers: int, to: int) -> int:
    """Layer `index` (Python-style) of `layers`, at the same relative depth among `to` layers."""
    index %= layers
    return round(index * (to - 1) / max(layers - 1, 1))


def reduced(cfg: Config, layers: int = 3, head_dim: int = 16, max_block_segment: int = 1024) -> Config:
    """`cfg` at `layers` layers (its kNN, recurrent and smeared-key layers at the same relative
    depth) and heads of `head_dim` (d_model = heads x head_dim, FFN 2 d_model); everything else,
    segment, memory and kNN sizes included, as it is, but a Block-Recurrent segment longer than
    `max_block_segment` (its blocks shortened in proportion)."""
    c = copy.deepcopy(cfg)
    m = c.model
    L, R = m.num_layers, min(m.num_layers, layers)
    if m.knn.enabled:
        m.knn.layers = tuple(sorted({_moved(i, L, R) for i in m.knn.layer_indices(L)}))
    if m.memory == "block_recurrent":
        m.block_recurrent.layer = _moved(m.block_recurrent.layer, L, R)
    m.smeared_keys = tuple(sorted({_moved(i, L, R) for i in m.smeared_keys}))
    m.num_layers = R
    m.head_dim, m.d_model = head_dim, m.num_heads * head_dim
    m.d_ff = 2 * m.d_model
    if m.memory == "block_recurrent" and c.data.seq_len > max_block_segment:
        # As many blocks per segment, each shorter (window = block, its state as many vectors):
        # PG-19's 8 blocks of 512 took 150 s to compile at 3 layers, 8 blocks of 128 take seconds.
        f = -(-c.data.seq_len // max_block_segment)
        b = m.block_recurrent
        c.data.seq_len, m.mem_len, b.block_len, b.state_size = (c.data.seq_len // f, m.mem_len // f,
                                                                 b.block_len // f, max(b.state_size // f, 1))
    return c


# What CI compiles besides each preset as it is: its layers scanned, rematerialised, or both.
# The remat policy is the one that keeps least (every activation recomputed in the backward pass).
VARIANTS = {"scan": {"scan_layers": True}, "remat": {"remat": "nothing_saveable"},
            "scan_remat": {"scan_layers": True, "remat": "nothing_saveable"}}
# The presets CI compiles in every variant and for the v4 slice: one of each memory kind's layer
# code (no memory, XL, kNN, LaMemo, Compressive, Block-Recurrent). Scan, remat and the chip wrap
# a memory kind's layers, not a preset's sizes: every variant of all 41 presets and each on the v4
# too was 164 more cases, about an hour more of CI on 2 cores (MEMTX_TPU_CASES=all compiles them).
# Block-Recurrent at its CPU size: its PG-19 twin takes 4-6 minutes a compile.
VARIANT_PRESETS = ("configs/txl.py:cpu_rpe", "configs/txl.py:wt103", "configs/knn.py:paper_65536",
                   "configs/lamemo.py:wt103", "configs/compressive.py:wt103", "configs/block_recurrent.py:cpu")
SCAN_LAYERS = 6  # a reduced preset's depth when scanned: its kNN or recurrent layer stays unrolled, the rest scan


def variant(cfg: Config, name: str) -> Config:
    """`cfg` (a full preset) reduced, with VARIANTS[name]'s options (name "": as it is)."""
    options = VARIANTS[name] if name else {}
    c = reduced(cfg, layers=SCAN_LAYERS if options.get("scan_layers") else 3)
    for key, value in options.items():
        setattr(c.model, key, value)
    return c


def scanned_runs(cfg: Config) -> list[tuple[int, int]]:
    """The layer ranges [a, b) of `cfg`'s model that run as one scan (more than one layer)."""
    from memtx.memory import registry
    return [(a, b) for a, b in registry.get(cfg.model.memory).layers.scan_runs(cfg.model) if b - a > 1]


def for_slice(cfg: Config, chips: int, batch: int | None = None) -> Config:
    """`cfg` data-parallel over the slice's `chips`, with batches of `batch` rows (default: the
    preset's own, rounded up to divide over the chips)."""
    c = copy.deepcopy(cfg)
    c.mesh.shape = (-1, 1, 1)
    c.data.batch_size = batch or -(-c.data.batch_size // chips) * chips
    c.data.eval_batch_size = batch or -(-c.data.eval_batch_size // chips) * chips
    return c


def compile_steps(cfg: Config, kind: str, chips: int, steps: tuple[str, ...] = ("train", "eval")) -> dict:
    """{"train": compiled train step, "eval": compiled eval step} (those in `steps`) of `cfg` for a
    `kind` slice of `chips` chips (one device per chip)."""
    return fit.compile_steps(cfg, fit.tpu_topology_devices(kind, chips), steps)


def analysis(compiled, kind: str) -> dict:
    """Per chip: XLA's memory analysis (bytes), its cost analysis (FLOPs, bytes accessed) and the
    roofline step time max(FLOPs / peak, bytes / HBM bandwidth) in seconds. What a roofline cannot
    see: custom calls XLA does not cost (the approximate top-k's PartialReduce), collectives over
    the slice's links, and how far the kernels are from their peak."""
    cost, chip = fit.cost_figures(compiled), CHIPS[kind]
    return {**fit.memory_figures(compiled), **cost,
            "roofline_s": max(cost["flops"] / chip["flops"], cost["bytes_accessed"] / chip["hbm_bytes_per_s"])}
