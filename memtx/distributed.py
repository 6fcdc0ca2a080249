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
coordinator or a bad port, a process id outside 0..n-1, a coordinator that does not answer
within `MEMTX_INIT_TIMEOUT` seconds (default 300), a process that never starts, two processes
with one id, or processes started with different counts. The last three come from a roll call
on the coordinator's port before JAX's runtime starts (`_roll_call_serve` / `_roll_call_join`),
so that every process that did start stops in one line instead of the runtime's abort.
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


# A roll call before JAX's runtime starts: on the coordinator's port, process 0 waits for every
# other process to say who it is; a peer that never comes, two processes with one id or different
# process counts then end every process that did start in one line, within MEMTX_INIT_TIMEOUT,
# where the runtime itself would abort (SIGABRT with a C++ stack). Lines of text over TCP:
#   peer -> 0: "HELLO <id> <count>"      0 -> every peer: "OK" or "FAIL <reason>"


def _roll_call_serve(port: int, pid_count: int, timeout: int) -> None:
    """Process 0: accepts the other processes' HELLOs until all n-1 ids are in."""
    try:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the runtime binds it next
        server.bind(("", port))
        server.listen(max(pid_count, 8))
    except OSError as e:
        raise DistributedError(f"process 0 cannot serve the coordinator on port {port} ({e.strerror or e}): "
                               "choose a free port in MEMTX_COORDINATOR") from None
    deadline = time.monotonic() + timeout
    ids: set[int] = set()
    conns: list[socket.socket] = []  # every peer that said hello: each gets the answer
    problem = None
    with server:
        while len(ids) < pid_count - 1 and problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, pid_count)) - ids)
                problem = (f"process(es) {', '.join(map(str, missing))} of {pid_count} did not start within "
                           f"{timeout}s (MEMTX_INIT_TIMEOUT)")
                break
            server.settimeout(min(left, 1.0))
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conn.settimeout(max(deadline - time.monotonic(), 1.0))
            try:
                words = conn.makefile("r").readline().split()
                if len(words) != 3 or words[0] != "HELLO":
                    raise ValueError(words)
                pid, count = int(words[1]), int(words[2])
            except (OSError, ValueError):
                conn.close()  # not one of ours (a port scanner, a health check)
                continue
            conns.append(conn)
            if count != pid_count:
                problem = (f"the processes were started with different MEMTX_NUM_PROCESSES ({pid_count} and {count}): "
                           "start every process with the same count")
            elif pid in ids or pid == 0:
                problem = f"two processes were started with MEMTX_PROCESS_ID={pid}: give each its own id"
            ids.add(pid)
        reply = b"OK\n" if problem is None else f"FAIL {problem}\n".encode()
        for conn in conns:
            try:
                conn.sendall(reply)
                conn.settimeout(5.0)
                conn.recv(1)  # the peer closes first: no TIME_WAIT left on the coordinator's port
            except OSError:
                pass
            conn.close()
    if problem is not None:
        raise DistributedError(problem)


def _roll_call_join(host: str, port: int, pid: int, count: int, timeout: int) -> None:
    """Processes 1..n-1: say who they are to process 0 and wait for its answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=min(5.0, max(timeout, 1)))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"the coordinator {host}:{port} did not answer process {pid} within {timeout}s "
                                       f"({e.strerror or e}): is process 0 running, and is the port reachable?") from None
            time.sleep(0.5)
    with conn:
        try:
            conn.sendall(f"HELLO {pid} {count}\n".encode())
            conn.settimeout(max(deadline - time.monotonic(), 1.0) + 5.0)
            answer = conn.makefile("r").readline().strip()
        except OSError as e:
            raise DistributedError(f"the coordinator {host}:{port} stopped answering process {pid} "
                                   f"({e.strerror or e})") from None
    if answer == "OK":
        return
    if answer.startswith("FAIL "):
        raise DistributedError(answer[5:])
    raise DistributedError(f"process 0 at {host}:{port} gave no roll-call answer to process {pid} within "
                           f"{timeout}s: another process may be using that port")


def initialize_from_env() -> bool:
    """Joins the distributed runtime if the environment asks for it; returns whether it did."""
    mode = os.environ.get("MEMTX_DISTRIBUTED")
    if mode not in (None, "", "auto", "off"):  # anything else would be ignored without a word
        raise DistributedError(f"MEMTX_DISTRIBUTED must be auto or off (or unset), got {mode!r}")
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
            _roll_call_serve(port, num, timeout)
        else:
            _roll_call_join(host, port, pid, num, timeout)
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
