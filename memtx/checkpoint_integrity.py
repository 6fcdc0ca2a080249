"""Integrity records of checkpoint steps: the size and CRC-32 of every file a step wrote.

Once a step's save has finished, process 0 writes `STEP/memtx_integrity.json` (local and shared
file systems; not gs://). `verify` compares a step's files with it: a garbled or truncated file,
a deleted item or an empty step directory is one phrase saying what is wrong. The policy of what
to do with a damaged step (skip it, move it aside) is the Checkpointer's (memtx/checkpoint.py).
"""

from __future__ import annotations

import json
import os
import zlib

INTEGRITY_FILE = "memtx_integrity.json"


def file_digests(step_dir: str) -> dict[str, list]:
    """{relative path: [size, crc32]} of every file under a step directory but the record."""
    out = {}
    for dirpath, _, filenames in os.walk(step_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, step_dir)
            if rel == INTEGRITY_FILE:
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            out[rel] = [os.path.getsize(path), crc]
    return out


def write_record(step_dir: str, step: int) -> None:
    """Records the step's files as they are now (atomically: a reader never sees half a record)."""
    record = {"step": step, "files": file_digests(step_dir)}
    tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def has_record(step_dir: str) -> bool:
    return os.path.exists(os.path.join(step_dir, INTEGRITY_FILE))


def verify(step_dir: str) -> str | None:
    """What is wrong with a step's files against its integrity record (one phrase), or None when
    they match or there is no record to check (a step saved before records, or killed before its
    record was written)."""
    if not os.path.isdir(step_dir) or not os.listdir(step_dir):
        return "its directory is empty"
    try:
        with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
            recorded = json.load(f)["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {INTEGRITY_FILE} is damaged"
    if not (isinstance(recorded, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            for v in recorded.values())):  # valid JSON of the wrong shape: as damaged as garbled bytes
        return f"its {INTEGRITY_FILE} is damaged (not a map of files to [size, crc32])"
    actual = file_digests(step_dir)
    for rel, (size, crc) in sorted(recorded.items()):
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel][0] != size:
            return f"{rel} has {actual[rel][0]} bytes where {size} were written"
        if actual[rel][1] != crc:
            return f"{rel} does not match its checksum"
    return None
