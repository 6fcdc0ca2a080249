"""An exclusive lock on a work directory (or a checkpoint directory outside it:
checkpoint_owner.py), so that two trainings never interleave one run's metrics and checkpoints.

`WORKDIR/.lock` is held with `fcntl.flock` (released by the kernel when the process ends, even
by kill -9: no stale locks) and names its holder (pid and host) for the second run's message.
Only the main process of a multi-process run takes it. A file system without flock support
(some network mounts) is reported once and not locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys

from memtx.config import ConfigError


class WorkdirLock:
    def __init__(self, workdir: str, what: str = "work directory"):
        self.path = os.path.join(workdir, ".lock")
        self.what = what  # how messages name it (a checkpoint directory is locked the same way)
        self._file = None

    def acquire(self) -> "WorkdirLock":
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"cannot write to the {self.what}: {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            other = "--workdir" if self.what == "work directory" else "train.checkpoint_dir"
            raise ConfigError(f"{self.what} {os.path.dirname(self.path) or '.'} is in use by {holder}: "
                              f"wait for that run to end, or use another {other}") from None
        except OSError as e:  # no flock on this file system
            print(f"note: cannot lock {self.path} ({e.strerror}); two runs on this work directory would "
                  "interleave", file=sys.stderr)
            f.close()
            return self
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
