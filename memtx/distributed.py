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
import socket
import time

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
    for name in ("SLURM_NTASKS", "SLURM_NPROCS"):
        value = _int_env(name)
        if value is not None:
            if value < 1:
                raise DistributedError(f"{name} must be >= 1, got {value}")
            return value
    return 1


def _coordinator(value: str, num: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not value or not host or not port:
        raise DistributedError(f"MEMTX_NUM_PROCESSES={num} but MEMTX_COORDINATOR (host:port of process 0) is "
                               f"{'not set' if not value else repr(value)}")
    try:
        port_number = int(port)
    except ValueError:
        port_number = -1
    if not 1 <= port_number <= 65535:
        raise DistributedError(f"MEMTX_COORDINATOR {value!r}: the port must be a number in 1..65535")
    return host, port_number


def _wait_for_coordinator(host: str, port: int, timeout: int, where: str) -> None:
    """Processes other than 0: the coordinator must accept connections within `timeout` seconds
    (checked here, so that an unanswering one is one line instead of the runtime's abort)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout, 1))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"the coordinator {host}:{port} did not answer {where} within {timeout}s "
                                       f"({e.strerror or e}): is process 0 running, and is the port reachable?") from None
            time.sleep(0.5)


def _check_port_free(host: str, port: int) -> None:
    """Process 0 serves the coordinator on `port`: taken by another program, it is one line."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the runtime's server binds
            sock.bind(("", port))
    except OSError as e:
        raise DistributedError(f"process 0 cannot serve the coordinator on port {port} ({e.strerror or e}): "
                               "choose a free port in MEMTX_COORDINATOR") from None


def initialize_from_env() -> bool:
    """Joins the distributed runtime if the environment asks for it; returns whether it did."""
    num = _int_env("MEMTX_NUM_PROCESSES")
    timeout = _int_env("MEMTX_INIT_TIMEOUT")
    if timeout is not None and timeout < 1:
        raise DistributedError(f"MEMTX_INIT_TIMEOUT must be a number of seconds >= 1, got {timeout}")
    timeout = timeout or 300
    if num is not None and num < 1:
        raise DistributedError(f"MEMTX_NUM_PROCESSES must be >= 1, got {num}")
    if num is not None and num > 1:
        coordinator = os.environ.get("MEMTX_COORDINATOR", "")
        pid = _int_env("MEMTX_PROCESS_ID")
        host, port = _coordinator(coordinator, num)
        if pid is None or not 0 <= pid < num:
            raise DistributedError(f"MEMTX_PROCESS_ID must be in 0..{num - 1} for MEMTX_NUM_PROCESSES={num}, "
                                   f"got {os.environ.get('MEMTX_PROCESS_ID')!r}")
        where = f"process {pid} of {num} at coordinator {coordinator}"
        if pid == 0:
            _check_port_free(host, port)
        else:
            _wait_for_coordinator(host, port, timeout, f"to process {pid}")
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
