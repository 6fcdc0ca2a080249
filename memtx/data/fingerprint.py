"""A corpus fingerprint: which data a run was trained or evaluated on, in a few fields.

Files (`data.corpus`, the stdlib default included): the number of documents, their bytes, and the
first 12 hex digits of the SHA-256 of the sorted relative paths with their sizes (no file is read,
only listed). A seqio task (`data.task`): its name and data directory, hashed the same way; what the
task's records hold is not read (that would cost a pass over the data).
"""

from __future__ import annotations

import hashlib
import os

from memtx.data.corpus import list_documents


def corpus_fingerprint(data_cfg) -> dict:
    """{"corpus" or "task", "documents", "bytes", "sha256"} ("documents"/"bytes" None for a task)."""
    digest = hashlib.sha256()
    if data_cfg.task:
        digest.update(f"task\0{data_cfg.task}\0{data_cfg.data_dir}".encode())
        return {"task": data_cfg.task, "data_dir": data_cfg.data_dir, "documents": None, "bytes": None,
                "sha256": digest.hexdigest()[:12], "of": "task name and data directory"}
    total = 0
    docs = list_documents(data_cfg.corpus)
    for doc in docs:
        try:
            size = os.stat(doc.path).st_size
        except OSError:
            size = -1  # unreadable: counted as such, as the sources skip it
        total += max(size, 0)
        digest.update(f"{doc.relpath}\0{size}\n".encode("utf-8", "surrogateescape"))
    return {"corpus": data_cfg.corpus, "documents": len(docs), "bytes": total, "sha256": digest.hexdigest()[:12],
            "of": "sorted relative paths and sizes"}


def describe(fp: dict) -> str:
    """One line: 'corpus stdlib: 1,790 documents, 31.5 MB, fingerprint 3f2a9c0d41b7'."""
    if fp.get("task"):
        where = f" ({fp['data_dir']})" if fp.get("data_dir") else ""
        return f"task {fp['task']}{where}, fingerprint {fp['sha256']}"
    size = f"{fp['bytes'] / 1e6:,.1f} MB" if fp["bytes"] >= 1e6 else f"{fp['bytes']:,} bytes"
    return f"corpus {fp['corpus']}: {fp['documents']:,} documents, {size}, fingerprint {fp['sha256']}"
