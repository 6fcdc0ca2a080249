"""orbax's and tensorstore's noise when a checkpoint write or read fails, silenced on request.

A failed save (a full disk, a read-only mount) or read (a damaged file) makes orbax log multi-line
errors, asyncio print "Task exception was never retrieved" per abandoned read, and tensorstore's
threads raise "Event loop is closed" per array; memtx reports each failure itself in one line
(memtx/checkpoint.py). `quiet()` installs the filters (once; the Checkpointer calls it): nothing is
changed by importing this module.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

# Why a write fails, as the OS words it (named in memtx's one line; orbax's own logs of it dropped).
WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


class _QuietFailedSaves(logging.Filter):
    """Drops orbax's multi-line error logs about a failed write (a full disk, a read-only mount):
    memtx reports the failure itself, in one line."""

    SIGNS = (*WRITE_FAILURES, "Save Finalize thread", "Handler Commit operations")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(sign in text for sign in self.SIGNS)


class _QuietAbandonedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's parallel array reads: when
    one read fails (a damaged file, another model's shapes) the others' errors are never awaited,
    and asyncio prints each with its traceback. memtx reports the failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("never retrieved" in text and "orbax" in text)


def _quiet_closed_loop_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops "Event loop is closed" from tensorstore's write
    threads. When one array write of an async save fails (a full disk), orbax's event loop ends
    and closes while the other writes are still finishing; their completion callbacks, called from
    tensorstore's C++ threads, then fail to schedule onto the closed loop and Python prints each
    as an unraisable exception (a traceback per array, interleaved). memtx reports the failed
    save itself, in one line; every other unraisable exception still goes to `previous`."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


_installed = False


def quiet() -> None:
    """Installs the three filters (idempotent): absl's log of failed saves, asyncio's abandoned
    reads, the closed event loop's unraisable exceptions."""
    global _installed
    if _installed:
        return
    logging.getLogger("absl").addFilter(_QuietFailedSaves())
    logging.getLogger("asyncio").addFilter(_QuietAbandonedReads())
    sys.unraisablehook = _quiet_closed_loop_callbacks(sys.unraisablehook)
    _installed = True
