"""The batch layout every step reads (train, evaluation, studies, recall, generation's
teacher-forced checks): per row, one segment of N positions of one document.

    inputs   int32 [B, N]    token ids; padding after the row's valid prefix
    targets  int32 [B, N]    the id after each input
    weights  float32 [B, N]  1 on the valid prefix (scored, and written to memory), 0 after it
    reset    bool [B]        the segment starts a document: the row's memory is emptied first
    loss_weights float32 [B, N]  the training loss's weight of each target (`data.loss_mask`): equal
                             to `weights` unless a mask scores some valid tokens only (the recall
                             task's answers); every valid token is still read and written to memory.
                             Evaluation scores every valid token.

A row with nothing to read (its documents are done) is all padding with weight 0 and leaves its
memory as it is.
"""

from __future__ import annotations

import numpy as np

KEYS = ("inputs", "targets", "weights", "reset", "loss_weights")
DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32, "reset": np.bool_,
          "loss_weights": np.float32}


def shape(key: str, rows: int, seq_len: int) -> tuple[int, ...]:
    return (rows,) if key == "reset" else (rows, seq_len)


def empty(rows: int, seq_len: int, pad_id: int) -> dict:
    """A batch of padding only (weights 0, no reset), to fill row by row."""
    return {key: np.full(shape(key, rows, seq_len), pad_id if key in ("inputs", "targets") else 0, DTYPES[key])
            for key in KEYS}


def complete(batch: dict) -> dict:
    """`batch` with every key: a batch without `loss_weights` trains on every valid token."""
    if "loss_weights" in batch:
        return batch
    return {**batch, "loss_weights": np.asarray(batch["weights"], np.float32)}


def shardings(tokens_sharding, rows_sharding) -> dict:
    """Each key's sharding: [B, N] arrays over `tokens_sharding`, the [B] flags over `rows_sharding`."""
    return {key: rows_sharding if key == "reset" else tokens_sharding for key in KEYS}


def abstract(rows: int, seq_len: int, shardings_by_key: dict) -> dict:
    """jax.ShapeDtypeStructs of a batch (to lower a step without data)."""
    import jax

    return {key: jax.ShapeDtypeStruct(shape(key, rows, seq_len), DTYPES[key], sharding=shardings_by_key[key])
            for key in KEYS}
