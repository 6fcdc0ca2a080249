"""The training loss masks that `data.loss_mask` names: each maps a document's token ids to each
target's loss weight (memtx/data/stream.py puts it in the batch's `loss_weights`). Evaluation
scores every token whatever the mask.

    ""                   every valid token (language modelling)
    kv_recall_answers    the answers of the associative recall task (memtx/data/kv_recall.py)
"""

from __future__ import annotations

from memtx import config
from memtx.data import kv_recall

LOSS_MASKS = {"": None, "kv_recall_answers": kv_recall.answer_mask}
if tuple(LOSS_MASKS) != config.LOSS_MASKS:  # the config validates the names without importing this module
    raise ImportError(f"memtx.config.LOSS_MASKS {config.LOSS_MASKS} differs from the masks defined here")


def get(name: str):
    """The mask function `name` names (None: every token); a KeyError names the known ones."""
    try:
        return LOSS_MASKS[name]
    except KeyError:
        raise KeyError(f"unknown loss mask '{name}' (one of {', '.join(repr(n) for n in LOSS_MASKS)})") from None
