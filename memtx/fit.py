"""Will a config fit a target before you pay for it? Per-device bytes of every part of training.

    python -m memtx.fit --config configs/knn.py:wt103 --target v5e-16 [--config.KEY=VALUE ...]
    python -m memtx.fit --config configs/txl.py:cpu --target cpu     # this machine's devices, with
                                                                   # the compiled step's own figures

Targets: a TPU slice `v4-N`, `v5p-N` (N TensorCores, 2 per chip), `v5e-N`, `v6e-N` (N chips), or
GPUs `h100xN`, `h200xN`, `a100xN` (80 GB), or `cpu` (the devices JAX sees here). The mesh is the
config's `mesh.shape` over the target's device count (one -1 fills it). Parameters, optimizer
state and memories are exact (their shapes and shardings); activations are an estimate of what
the backward pass keeps (per layer: the residual stream, attention inputs and outputs, attention
scores and probabilities over N x (M + N), the FFN hidden layer; plus the logits). `cpu` compiles
the real step and prints XLA's memory analysis beside the estimate; `--aot` does the same for a
TPU slice on a machine without TPUs, when libtpu is installed (pip install "jax[tpu]").

    python -m memtx.fit --config configs/lamemo.py:wt103 --target v5e-16 --aot
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys

import jax
import jax.numpy as jnp

from memtx import batch as batch_layout
from memtx.cli import ArgumentParser, UsageError, resolve_config, run_cli
from memtx.config import Config, ConfigError, data_parallel_size, validate
from memtx.memory import add_ons, registry

GIB = 2**30
# bytes of memory per device, and how many devices a slice name's number counts
DEVICE_BYTES = {"v4": 32 * GIB, "v5p": 95 * GIB, "v5e": 16 * GIB, "v6e": 32 * GIB,
                "h100": 80 * GIB, "h200": 141 * GIB, "a100": 80 * GIB}
CORES_PER_CHIP = {"v4": 2, "v5p": 2}
GPUS = ("h100", "h200", "a100")
ACTIVATIONS = "activations, gradients (estimate)"


def parse_target(target: str) -> tuple[str, int, int]:
    """'v5e-16' -> ('v5e', 16 devices, bytes per device); 'cpu' -> this machine's devices."""
    if target == "cpu":
        from memtx.state import device_memory_bytes

        return "cpu", jax.device_count(), device_memory_bytes()
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)|(h100|h200|a100)x(\d+)", target.lower())
    if not m:
        raise UsageError(f"unknown --target {target!r}; e.g. v4-32, v5p-64, v5e-16, v6e-8, h100x8, h200x16, cpu")
    kind, n = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    devices = n // CORES_PER_CHIP.get(kind, 1)
    if devices < 1:
        raise UsageError(f"--target {target}: no whole device")
    return kind, devices, DEVICE_BYTES[kind]


def _per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(cfg: Config, batch_per_device: int, param_bytes: int) -> int:
    """Estimated temporary bytes of the train step on one device: what the backward pass keeps,
    the add-ons' (the kNN search's scores), and the gradients and updates (twice the parameters,
    float32)."""
    m, N = cfg.model, cfg.data.seq_len
    b = batch_per_device
    act = jnp.dtype(m.dtype).itemsize
    heads, dh = m.num_heads, m.dim_per_head
    kind = registry.of(m)
    keys = kind.state.attended_rows(m, N)
    per_layer = b * N * (6 * m.d_model + 3 * heads * dh + m.d_ff) * act  # residual, norms, q/k/v/out, FFN
    per_layer += b * keys * m.d_model * act * 2  # keys/values over memory + segment
    per_layer += 2 * b * heads * N * keys * 4  # scores and probabilities (float32)
    per_layer += kind.state.extra_activation_bytes(m, b, N)  # the kind's own (look-ahead, reconstruction, state)
    logits = 2 * b * N * m.padded_vocab_size * 4  # float32 logits and their softmax
    return m.num_layers * per_layer + logits + add_ons.activation_bytes(m, b, N) + 2 * param_bytes


def estimate(cfg: Config, num_devices: int, setup=None) -> dict:
    """Per-device bytes of parameters, optimizer state, memories and activations on a mesh of
    `num_devices` devices (the config's mesh.shape; nothing is allocated). `setup`: the run's own
    (state.build on this machine's mesh), not built again."""
    from memtx import state as state_lib

    shape = validate(cfg, num_devices)
    if setup is None:
        mesh = jax.sharding.AbstractMesh(shape, cfg.mesh.axes,
                                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
        setup = state_lib.build(cfg, mesh, check_fit=False)
    mesh = setup.mesh
    abstract = setup.abstract_state
    memory = state_lib.abstract_memory(setup, cfg.data.batch_size)
    data_parallel = data_parallel_size(cfg.mesh.rules, dict(mesh.shape))
    params = _per_device_bytes(abstract["params"])
    parts = {"parameters": params,
             "optimizer state": _per_device_bytes(abstract["opt_state"]),
             "memories": _per_device_bytes(memory),
             ACTIVATIONS: activation_bytes(cfg, max(cfg.data.batch_size // data_parallel, 1), params)}
    return {"mesh": dict(zip(cfg.mesh.axes, shape)), "parts": parts, "total": sum(parts.values())}


# Chips -> the slice's physical topology name (2D tori for v5e/v6e, 3D for v4/v5p).
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8"}


def find_libtpu() -> bool:
    """Whether libtpu can be loaded: installed, or where scripts/setup_env.sh puts it
    (`.venv/libtpu`, or $MEMTX_LIBTPU_DIR), kept off the import path because with libtpu importable
    every JAX start looks for a TPU. Found there, it goes on the path once this machine's own
    devices are up (they must not look for a TPU)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    for where in filter(None, (os.environ.get("MEMTX_LIBTPU_DIR"), os.path.join(sys.prefix, "libtpu"))):
        if os.path.isfile(os.path.join(where, "libtpu", "__init__.py")):
            jax.devices()
            sys.path.insert(0, where)
            importlib.invalidate_caches()
            return True
    return False


def tpu_topology_devices(kind: str, chips: int):
    """The devices of a TPU slice described by libtpu, for compiling ahead of time on a machine
    without TPUs (needs `pip install "jax[tpu]"`); raises UsageError saying why it cannot."""
    names = _TOPOLOGY_3D if kind in CORES_PER_CHIP else _TOPOLOGY_2D
    if chips not in names:
        raise UsageError(f"no known {kind} topology of {chips} chips for --aot (known: {sorted(names)})")
    find_libtpu()
    # What libtpu reads when it loads, for this call only: these variables also mean "a TPU VM of
    # several hosts" to the distributed start-up (memtx/distributed.py) of anything started later.
    # No TPU metadata server to ask here; and libtpu locks /tmp/libtpu_lockfile for a process's
    # life, as if it held a TPU: two processes compiling at once must not refuse each other.
    saved = {k: os.environ.get(k) for k in ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    os.environ.update({k: os.environ.get(k) or v for k, v in zip(saved, ("1", "localhost", "1"))})
    try:
        from jax.experimental import topologies

        # Chips of two TensorCores (v4, v5p) as JAX runs them on a TPU VM: one device per chip
        # (megacore), with the chip's whole HBM. Described per core, a device has half of it.
        megacore = {"chip_config_name": "megacore"} if kind in CORES_PER_CHIP else {}
        devices = topologies.get_topology_desc(f"{kind}:{names[chips]}", "tpu", **megacore).devices
    except Exception as e:  # no libtpu, or a libtpu that cannot describe this slice
        raise UsageError(f"cannot compile for {kind}:{names[chips]} here ({' '.join(str(e).split())[:200]}); "
                         "install libtpu with pip install \"jax[tpu]==$(jax version)\"") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if len(devices) != chips:
        raise UsageError(f"libtpu describes {kind}:{names[chips]} as {len(devices)} devices, not one per chip ({chips})")
    return devices


def compiled_memory(cfg: Config, devices=None) -> dict:
    """XLA's own memory analysis (per device) of the train step compiled for `devices`: this
    machine's by default, or a TPU slice's from `tpu_topology_devices` (ahead of time)."""
    return memory_figures(compile_steps(cfg, devices)["train"])


def memory_figures(compiled) -> dict:
    """A compiled step's memory analysis, per device, in bytes."""
    stats = compiled.memory_analysis()
    return {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
            "temporaries": int(stats.temp_size_in_bytes), "aliased": int(stats.alias_size_in_bytes)}


def cost_figures(compiled) -> dict:
    """A compiled program's cost analysis, per device: FLOPs and bytes accessed (NaN where XLA
    does not count them)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per program
    return {"flops": float(cost.get("flops", math.nan)), "bytes_accessed": float(cost.get("bytes accessed", math.nan))}


def compile_steps(cfg: Config, devices=None, steps: tuple[str, ...] = ("train",)) -> dict:
    """{"train": ..., "eval": ...} (those named in `steps`): the steps compiled for `devices` (this
    machine's by default, or a TPU slice's from `tpu_topology_devices`, ahead of time), each with
    its .memory_analysis(), .cost_analysis() and .as_text()."""
    import flax.linen as nn

    from memtx import sharding
    from memtx import state as state_lib
    from memtx.step import make_eval_step, make_train_step

    mesh = None if devices is None else sharding.make_mesh(cfg, list(devices))
    setup = state_lib.build(cfg, mesh, check_fit=devices is None)
    shardings = state_lib.batch_shardings(setup)
    # Built outside the mesh's context: they run a little eagerly, on this machine's devices.
    made = {"train": (make_train_step, setup.abstract_state, cfg.data.batch_size),
            "eval": (make_eval_step, setup.abstract_state["params"], cfg.data.eval_batch_size)}
    lowerable = {name: (made[name][0](setup).jitted, made[name][1], state_lib.abstract_memory(setup, made[name][2]),
                        batch_layout.abstract(made[name][2], cfg.data.seq_len, shardings)) for name in steps}
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.rules(cfg)):
        return {name: jitted.lower(*args).compile() for name, (jitted, *args) in lowerable.items()}


def _fmt(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.2f} MiB"


SHRINK = ("lower data.batch_size, data.seq_len, model.d_model, model.d_ff, model.num_layers or model.knn.size, "
          "use model.dtype=bfloat16, or spread it over more devices (mesh.shape)")


def check_fits_here(cfg: Config, setup=None) -> None:
    """Before compiling a training: the full per-device estimate (parameters, optimizer state,
    memories, activations) against the memory of this process's devices (CPU devices share the
    host's RAM). A one-line ConfigError naming the parts and the keys to shrink; with
    `train.check_memory=false` nothing is checked (the estimate's activations are approximate)."""
    if not cfg.train.check_memory:
        return
    from memtx.state import device_memory_bytes

    result = estimate(cfg, jax.device_count(), setup)
    limit = device_memory_bytes()
    local = jax.local_devices()
    sharing = len(local) if local[0].platform == "cpu" else 1  # CPU "devices" share one RAM
    need = result["total"] * sharing
    if need > limit:
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(result["parts"].items(), key=lambda kv: -kv[1]))
        where = f"{sharing} CPU devices' share of {_fmt(limit)} of RAM" if sharing > 1 else f"{_fmt(limit)} per device"
        raise ConfigError(f"training needs about {_fmt(result['total'])} per device ({parts}) but there is "
                          f"{where}: {SHRINK} (python -m memtx.fit shows the parts; "
                          "--config.train.check_memory=false skips this estimate)")


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = resolve_config(args.config, None, rest)
    kind, devices, device_bytes = parse_target(args.target)
    result = estimate(cfg, devices)
    print(f"{args.config} on {args.target}: {devices} devices of {_fmt(device_bytes)}, mesh {result['mesh']}, "
          f"batch {cfg.data.batch_size} x {cfg.data.seq_len}, memory {cfg.model.mem_len}"
          + (f", kNN {cfg.model.knn.size} slots" if cfg.model.knn.enabled else ""))
    print("| per device | bytes |\n|---|---:|")
    for name, n in result["parts"].items():
        print(f"| {name} | {_fmt(n)} |")
    print(f"| **total** | **{_fmt(result['total'])}** ({result['total'] / device_bytes:.0%} of the device) |")
    if kind == "cpu" or args.aot:
        if kind in GPUS:
            raise UsageError("--aot compiles for TPU slices only (a GPU target needs the GPUs)")
        xla = compiled_memory(cfg, None if kind == "cpu" else tpu_topology_devices(kind, devices))
        exact = sum(v for k, v in result["parts"].items() if k != ACTIVATIONS)
        print(f"XLA's analysis of the step compiled for {'this machine' if kind == 'cpu' else args.target}, "
              f"per device: arguments {_fmt(xla['arguments'])} (estimate: "
              f"{_fmt(exact)} + the batch), temporaries {_fmt(xla['temporaries'])} (estimate: "
              f"{_fmt(result['parts'][ACTIVATIONS])})")
    total, basis = result["total"], "estimate"
    if kind != "cpu" and args.aot:  # the compiler's own figure for the real target decides
        total, basis = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"], "XLA"
    fits = total <= 0.9 * device_bytes
    print(f"{'fits' if fits else 'does NOT fit'} ({basis}): {_fmt(total)} of {_fmt(0.9 * device_bytes)} usable "
          "(90%; XLA's buffers and fragmentation take the rest)")
    return 0 if fits else 1


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/NAME.py[:preset]")
    p.add_argument("--target", required=True, help="v4-32, v5p-64, v5e-16, v6e-8, h100x8, h200x16, a100x8 or cpu")
    p.add_argument("--aot", action="store_true", help="also compile the step ahead of time for the TPU slice with "
                                                      "libtpu (pip install \"jax[tpu]\") and print XLA's analysis")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
