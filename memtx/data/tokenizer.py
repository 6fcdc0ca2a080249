"""Byte-level tokenizer: ids 0..255 are raw bytes, followed by a few special ids."""

from __future__ import annotations

from typing import Iterable

import numpy as np

PAD_ID: int = 256
"""Padding id: used for both inputs and targets of padded positions (weight 0)."""

BOS_ID: int = 257
"""Beginning-of-document id: the first input of every document."""

EOS_ID: int = 258
"""End-of-document id: reserved, currently never emitted."""

VOCAB_SIZE: int = 259
"""Number of ids: 256 bytes plus PAD, BOS and EOS."""


def encode(data: bytes) -> np.ndarray:
    """Return the byte ids of `data` as an int32 array (no BOS/EOS added)."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> bytes:
    """Return the bytes of `ids`, dropping special ids (>= 256)."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
    return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
