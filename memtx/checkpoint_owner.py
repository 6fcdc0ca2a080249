"""Which run a checkpoint directory belongs to, so that no training writes into another's.

The work directory's lock and its saved config guard the default checkpoints (WORKDIR/checkpoints).
A `train.checkpoint_dir` elsewhere is guarded here, before anything is written:

- a resumed run whose `train.checkpoint_dir` changed since it was saved is refused: its
  checkpoints are where it saved them;
- a local checkpoint directory outside the work directory is locked with the work directory
  (`.lock`, as workdir_lock.py) and records its owner (`memtx_owner.json`: the work directory);
  one that holds steps of another work directory, or steps with no owner that this work directory
  did not write, is refused.

`memtx.train --adopt-checkpoints` takes such a directory over on purpose (a run moved to another
path, checkpoints copied to a new place): it continues from the steps there and records the new
owner. Remote directories (gs://) get the first check only: no lock or record there.
"""

from __future__ import annotations

import json
import os

from memtx.config import Config
from memtx.errors import ConfigError
from memtx.workdir_files import DamagedFile, read_json
from memtx.workdir_lock import WorkdirLock

OWNER_FILE = "memtx_owner.json"
ADOPT = "--adopt-checkpoints"


def checkpoint_dir(cfg: Config, workdir: str) -> str:
    """Where a run's checkpoints are: `train.checkpoint_dir`, or WORKDIR/checkpoints."""
    return cfg.train.checkpoint_dir or os.path.join(workdir, "checkpoints")


def _separate(cfg: Config, workdir: str) -> bool:
    """A local checkpoint directory outside the work directory (which the work directory's lock
    does not cover)."""
    path = cfg.train.checkpoint_dir
    if not path or "://" in path:
        return False
    return not (os.path.realpath(path) + os.sep).startswith(os.path.realpath(workdir) + os.sep)


def _steps(path: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(path) if n.isdigit())
    except OSError:
        return []


def read_owner(path: str) -> str | None:
    """The work directory recorded as the owner of checkpoint directory `path` (None: no record)."""
    record = os.path.join(path, OWNER_FILE)
    if not os.path.exists(record):
        return None
    try:
        owner = read_json(record).get("workdir")
    except DamagedFile as e:
        raise ConfigError(f"{e}; restore it, or pass {ADOPT} to claim the checkpoint directory for this run") from None
    if not isinstance(owner, str):
        raise ConfigError(f"{record}: key 'workdir' must be a path, got {owner!r:.60}; pass {ADOPT} to claim it")
    return owner


def check(cfg: Config, saved: Config | None, workdir: str, adopt: bool) -> None:
    """Refuses, in one line and before anything is written, a checkpoint directory this run must
    not use (the module docstring); `saved`: the work directory's saved config (None: a new run)."""
    if saved is not None and saved.train.checkpoint_dir != cfg.train.checkpoint_dir and not adopt:
        raise ConfigError(f"work directory '{workdir}' saved its checkpoints in "
                          f"'{checkpoint_dir(saved, workdir)}' but train.checkpoint_dir now names "
                          f"'{checkpoint_dir(cfg, workdir)}': set it back, or pass {ADOPT} to continue from the "
                          "checkpoints there")
    if not _separate(cfg, workdir) or adopt:
        return
    path = cfg.train.checkpoint_dir
    steps = _steps(path)
    owner = read_owner(path)
    me = os.path.realpath(workdir)
    if owner is not None and os.path.realpath(owner) != me:
        raise ConfigError(f"checkpoint directory '{path}' belongs to the run in '{owner}'"
                          + (f" (steps {steps[0]}..{steps[-1]})" if steps else "")
                          + f": use another train.checkpoint_dir, or pass {ADOPT} to continue from its checkpoints")
    if owner is None and steps and saved is None:
        raise ConfigError(f"checkpoint directory '{path}' already holds checkpoints (steps {steps[0]}..{steps[-1]}) "
                          f"that this new run did not write: use another train.checkpoint_dir, or pass {ADOPT} to "
                          "continue from them")


def claim(cfg: Config, workdir: str) -> WorkdirLock | None:
    """Locks a separate local checkpoint directory (held until the run ends) and records this work
    directory as its owner. Call after `check`, on the main process."""
    if not _separate(cfg, workdir):
        return None
    path = cfg.train.checkpoint_dir
    lock = WorkdirLock(path, what="checkpoint directory").acquire()
    record = os.path.join(path, OWNER_FILE)
    tmp = f"{record}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"workdir": os.path.realpath(workdir)}, f)
        os.replace(tmp, record)
    except OSError as e:
        lock.release()
        raise ConfigError(f"cannot write {record}: {e.strerror or e}") from None
    return lock
