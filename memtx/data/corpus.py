"""Corpora of documents (one file = one document) and their deterministic splits."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[int, int, int] = (98, 1, 1)

_GLOB_MAGIC = re.compile(r"[*?\[]")
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages"})


class CorpusError(ValueError):
    """A corpus or split cannot be used; the message is one line naming the path."""


@dataclass(frozen=True)
class Document:
    """One document: `relpath` ('/'-separated, relative to the corpus root) and its file `path`."""

    relpath: str
    path: str


def _walk_files(root: str, exclude_dirs: frozenset[str] = frozenset()) -> Iterator[str]:
    """Yield regular files under `root`, skipping hidden entries, `__pycache__`, symlinked
    directories and directories named in `exclude_dirs`."""
    skip = exclude_dirs | {"__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and os.path.isfile(path):
                yield path


def _relpath(path: str, root: str) -> str:
    """`path` relative to `root`, with '/' separators."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def _glob_root(pattern: str) -> str:
    """The longest directory prefix of `pattern` that contains no glob characters."""
    parts = pattern.split("/")
    prefix: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        prefix.append(part)
    root = "/".join(prefix)
    if not root:
        return "/" if pattern.startswith("/") else "."
    return root


def _glob_regex(pattern: str) -> re.Pattern:
    """A '/'-separated glob pattern (relative to its root) as a regex over relpaths: `*` and `?`
    within one path component, `[...]` a character class, `**/` any number of directories, a
    final `**` everything below."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body.replace("\\", "\\\\")) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _glob_files(pattern: str) -> tuple[str, list[str]]:
    """(root, files) of a glob pattern: the files under its fixed prefix, walked without ever
    following a symlinked directory (so a link loop cannot hang it), whose relpath matches."""
    root = _glob_root(pattern)
    if root == "/":
        rest = pattern[1:]
    elif root == ".":
        rest = pattern[2:] if pattern.startswith("./") else pattern
    else:
        rest = pattern[len(root):].lstrip("/")
    regex = _glob_regex(rest)
    if not os.path.isdir(root):
        return root, []
    return root, [p for p in _walk_files(root) if regex.match(_relpath(p, root))]


def _stdlib_documents() -> tuple[str, list[str]]:
    """Root and `.py` files of the running interpreter's standard library (no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    return root, [p for p in _walk_files(root, _EXCLUDED_STDLIB_DIRS) if p.endswith(".py")]


def list_documents(source: str) -> list[Document]:
    """List the documents of `source`, sorted by relpath.

    `source` is "stdlib" (the interpreter's standard library `.py` files), a directory
    (all regular non-hidden files, recursively), a glob pattern (recursive `**` allowed)
    or a single file. Symlinked directories are never followed.
    Raises CorpusError if the path does not exist or yields no documents.
    """
    if source == "stdlib":
        root, files = _stdlib_documents()
    elif _GLOB_MAGIC.search(source):
        root, files = _glob_files(os.path.expanduser(source))
    elif os.path.isdir(source):
        root, files = source, list(_walk_files(source))
    elif os.path.isfile(source):
        root, files = os.path.dirname(source) or ".", [source]
    else:
        raise CorpusError(f"corpus path {source!r} does not exist")

    docs = {}
    for path in files:
        relpath = _relpath(path, root)
        docs[relpath] = Document(relpath=relpath, path=os.path.abspath(path))
    if not docs:
        raise CorpusError(f"corpus {source!r} has no documents")
    return [docs[k] for k in sorted(docs)]


def _check_fractions(fractions: Sequence[int]) -> None:
    """Raise CorpusError unless `fractions` is three non-negative ints with a positive sum."""
    if (
        len(fractions) != len(SPLITS)
        or any(int(f) != f or f < 0 for f in fractions)
        or sum(fractions) <= 0
    ):
        raise CorpusError(f"split fractions {tuple(fractions)!r} must be 3 non-negative ints with a positive sum")


def split_of(relpath: str, fractions: Sequence[int] = DEFAULT_FRACTIONS) -> str:
    """The split ("train", "validation" or "test") of a document, by a hash of its relpath."""
    _check_fractions(fractions)
    bucket = int(hashlib.sha1(os.fsencode(relpath)).hexdigest(), 16) % int(sum(fractions))  # any file name
    if bucket < fractions[0]:
        return "train"
    if bucket < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _corpus_root(docs: Sequence[Document]) -> str:
    """A human-readable name of the corpus of `docs` (its root directory)."""
    doc = docs[0]
    suffix = "/" + doc.relpath
    path = doc.path.replace(os.sep, "/")
    return path[: -len(suffix)] if path.endswith(suffix) else os.path.dirname(doc.path)


def split_documents(
    docs: Sequence[Document], split: str, fractions: Sequence[int] = DEFAULT_FRACTIONS
) -> list[Document]:
    """The documents of `docs` in `split`, in their given order.

    Raises CorpusError for an unknown split name or an empty split.
    """
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not docs:
        raise CorpusError(f"split {split!r} is empty: the corpus has no documents")
    selected = [d for d in docs if split_of(d.relpath, fractions) == split]
    if not selected:
        raise CorpusError(f"split {split!r} of corpus {_corpus_root(docs)!r} has no documents")
    return selected


def read_bytes(doc: Document) -> bytes:
    """The bytes of `doc`; raises OSError if the file cannot be read."""
    with open(doc.path, "rb") as f:
        return f.read()


def read_document(doc: Document) -> bytes:
    """The bytes of `doc`; b"" (with one logged warning) if the file cannot be read."""
    try:
        return read_bytes(doc)
    except OSError as e:
        logger.warning("cannot read document %r: %s", doc.path, e)
        return b""
