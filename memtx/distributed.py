"""Joining JAX's distributed runtime (several processes, one mesh) from the environment.

`initialize_from_env()` is called by the commands before JAX touches a device:

- `MEMTX_NUM_PROCESSES` > 1 (with `MEMTX_COORDINATOR=host:port` and `MEMTX_PROCESS_ID`): joins
  explicitly. `launch/gpu_multinode.sh` sets these (from SLURM's variables when present), and so
  does the multi-process test on 127.0.0.1.
- `MEMTX_DISTRIBUTED=auto`, or a SLURM job step with several tasks, or a Cloud TPU VM: calls
  `jax.distributed.initialize()` with no arguments, which reads the TPU VM's metadata or SLURM's
  variables itself (`launch/tpu_vm.sh` runs the same command on every worker).
- otherwise: one process, nothing to do.

Every problem is a one-line DistributedError before anything is compiled: a missing
coordinator, a process id outside 0..n-1, a coordinator that does not answer within
`MEMTX_INIT_TIMEOUT` seconds (default 300), or processes started with different counts.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np

from memtx.config import ConfigError


class DistributedError(ConfigError):
    """The environment describes a multi-process run that cannot start; the message is one line."""


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _on_cloud_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or os.environ.get("TPU_WORKER_HOSTNAMES"))


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or 1)


def initialize_from_env() -> bool:
    """Joins the distributed runtime if the environment asks for it; returns whether it did."""
    num = _int_env("MEMTX_NUM_PROCESSES")
    timeout = _int_env("MEMTX_INIT_TIMEOUT") or 300
    if num is not None and num > 1:
        coordinator = os.environ.get("MEMTX_COORDINATOR", "")
        pid = _int_env("MEMTX_PROCESS_ID")
        if not coordinator or ":" not in coordinator:
            raise DistributedError(f"MEMTX_NUM_PROCESSES={num} but MEMTX_COORDINATOR (host:port of process 0) is "
                                   f"{'not set' if not coordinator else repr(coordinator)}")
        if pid is None or not 0 <= pid < num:
            raise DistributedError(f"MEMTX_PROCESS_ID must be in 0..{num - 1} for MEMTX_NUM_PROCESSES={num}, "
                                   f"got {os.environ.get('MEMTX_PROCESS_ID')!r}")
        where = f"process {pid} of {num} at coordinator {coordinator}"
        kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    elif num is None and (os.environ.get("MEMTX_DISTRIBUTED") == "auto" or _slurm_tasks() > 1 or _on_cloud_tpu_vm()):
        where, kwargs = "the cluster JAX detects (TPU VM metadata or SLURM)", {}
    else:
        return False
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError / ValueError with long messages
        first = " ".join(str(e).split())[:300]
        raise DistributedError(f"could not join the distributed runtime as {where} within {timeout}s ({first}); "
                               "start every process with the same MEMTX_NUM_PROCESSES and a reachable "
                               "MEMTX_COORDINATOR") from None
    if num is not None:
        # Every process compares every process's count, so all of them stop, not only the odd one.
        from jax.experimental import multihost_utils

        counts = sorted({int(c) for c in np.asarray(multihost_utils.process_allgather(np.array([num]))).ravel()})
        if counts != [num] or jax.process_count() != num:
            raise DistributedError(f"the processes were started with different MEMTX_NUM_PROCESSES ({counts}; the "
                                   f"runtime has {jax.process_count()}): start every process with the same count")
    return True


def is_main_process() -> bool:
    """Process 0 logs, writes metrics and config.json; every process checkpoints (orbax)."""
    return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
    """`print` on process 0; nothing on the others."""
    if is_main_process():
        print(*args, **kwargs)
