"""Associative recall of single-token keys and values: the task that shows the kNN memory recall.

A document is a run of two-token entries, a key then its value, with no separators. Keys and
values come from disjoint alphabets of the byte vocabulary (64 keys 0x80-0xBF, 64 values
0xC0-0xFF), as in Zoology's multi-query associative recall (Arora et al. 2023, "Zoology:
measuring and improving recall in efficient language models"):

    k17 v03  k42 v51  k17 v03  k08 v22 ... (much later) k42 v51 ...

The first entry of a key *defines* it with a random value; every later entry of that key is a
*query* and repeats the value (values never change within a document). At a query the model
has read the key and must predict the value: find the position after the last occurrence of this
key and copy its token, the induction pattern (Olsson et al. 2022).

Queries are *near* (the key's last entry at most `near_max` tokens back, inside the segment:
they teach the copy through local attention, whose keys and values are what the kNN memory
stores) or *far* (at least `gap` tokens back, beyond the segment plus the XL cache when
`gap >= N + M`: only the kNN memory can hold the value, and a model without it is at chance, one
in 64). Once every key is defined, every entry is a query, so far distances rarely exceed a few
times 2 * num_keys tokens (about 500 with 64 keys).

Longer distances come from *long-range keys* (`long_keys`, the last keys of the alphabet), which
the random process above never picks: each follows a plan drawn before the document, a first
entry at a random place in its first half and then one entry after another, each a distance
drawn log-uniformly from [gap, far_max] tokens after the last (pushed later by an entry when its
place is taken). The memory-size curve reads them: answers spread over every scale up to
far_max, whatever the store sizes.

Only the answers carry information: `answer_mask` gives the training loss's weights
(`data.loss_mask=kv_recall_answers`), 1 on the value of every query and 0 elsewhere (keys and
first definitions are random). Every token is still read and written to memory.

Documents are deterministic in (seed, index) alone; the generator needs only NumPy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from memtx.data import recall  # NumPy only at import (the model is imported where documents are scored)

KEY_BASE, VALUE_BASE = 0x80, 0xC0  # token ids (= bytes) of the first key and the first value


@dataclass(frozen=True)
class KVSpec:
    """The shape of the generated documents (lengths in tokens; an entry is 2 tokens)."""

    length: int = 256  # document length in tokens
    num_keys: int = 64  # keys KEY_BASE .. KEY_BASE + num_keys - 1
    num_values: int = 64  # values VALUE_BASE .. VALUE_BASE + num_values - 1
    define_prob: float = 0.25  # an entry defines a new key (while there are undefined keys)
    far_prob: float = 0.5  # a query is far (when a far key exists; else near)
    near_max: int = 28  # a near query's key was last seen at most this far back
    gap: int = 48  # a far query's key was last seen at least this far back (>= N + M)
    long_keys: int = 0  # of num_keys, the long-range keys (planned distances; none by default)
    far_max: int = 0  # a long-range key's distances are log-uniform in [gap, far_max] tokens

    def __post_init__(self):
        if not (2 <= self.length and 1 <= self.num_values <= 64 and 1 <= self.num_keys <= 64
                and 2 <= self.near_max < self.gap):
            raise ValueError(f"invalid kv recall spec {self} (1-64 keys and values, 2 <= near_max < gap)")
        if not (0 <= self.long_keys < self.num_keys and (self.long_keys == 0 or self.far_max >= self.gap)):
            raise ValueError(f"kv recall spec long_keys ({self.long_keys}) must be in [0, num_keys) and, when "
                             f"above 0, far_max ({self.far_max}) >= gap ({self.gap})")
        if self.num_keys - self.long_keys <= self.gap // 2:  # else a far key always exists once all are defined
            raise ValueError(f"kv recall spec num_keys - long_keys ({self.num_keys - self.long_keys}) must exceed "
                             f"gap / 2 ({self.gap // 2})")
        for name in ("define_prob", "far_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"kv recall spec {name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows which tokens are values but not which one."""
        return 1.0 / self.num_values


def make_document(seed: int, index: int, spec: KVSpec = KVSpec()) -> bytes:
    """Document `index` of the corpus with `seed` (the same tokens whatever the corpus size)."""
    rng = np.random.default_rng([seed, index])
    planned = _long_range_plan(np.random.default_rng([seed, index, 1]), spec)  # entry -> (key, value)
    random_keys = spec.num_keys - spec.long_keys  # keys 0 .. random_keys - 1 follow the random process
    out = bytearray()
    value: dict[int, int] = {}
    last: dict[int, int] = {}  # key -> offset of its latest value token
    previous = None  # the latest entry's key: a near query never repeats it right away
    while len(out) < spec.length:
        if len(out) // 2 in planned:
            key, planned_value = planned[len(out) // 2]
            out += bytes([KEY_BASE + key, VALUE_BASE + planned_value])
            continue
        at = len(out) + 1  # the offset the next entry's value will have
        near = [k for k, o in last.items() if at - o <= spec.near_max and k != previous]
        far = [k for k, o in last.items() if at - o >= spec.gap]
        key = None
        if len(value) == random_keys or rng.random() >= spec.define_prob:
            pool = far if far and (not near or rng.random() < spec.far_prob) else near
            if pool:
                key = pool[int(rng.integers(0, len(pool)))]
        if key is None:  # a definition of a new key (one is always left: see KVSpec's checks)
            free = [k for k in range(random_keys) if k not in value]
            key = free[int(rng.integers(0, len(free)))]
            value[key] = int(rng.integers(0, spec.num_values))
        out += bytes([KEY_BASE + key, VALUE_BASE + value[key]])
        last[key], previous = at, key
    return bytes(out)


def _long_range_plan(rng: np.random.Generator, spec: KVSpec) -> dict[int, tuple[int, int]]:
    """Entry index -> (key, value) of every long-range key's entries (see the module docstring)."""
    entries = (spec.length + 1) // 2
    plan: dict[int, tuple[int, int]] = {}
    low, high = np.log(spec.gap / 2), np.log(max(spec.far_max, spec.gap) / 2)  # in entries
    for key in range(spec.num_keys - spec.long_keys, spec.num_keys):
        value = int(rng.integers(0, spec.num_values))
        at = int(rng.integers(0, max(1, entries // 2)))
        while True:
            while at in plan:
                at += 1
            if at >= entries:
                break
            plan[at] = (key, value)
            at += int(np.ceil(np.exp(rng.uniform(low, high))))  # >= gap / 2 entries: >= gap tokens
    return plan


def write_corpus(directory: str, num_docs: int, seed: int, spec: KVSpec = KVSpec()) -> list[str]:
    """Writes `num_docs` documents `kv_00000.bin`, ... into `directory`; returns their paths."""
    return recall.write_documents(directory, num_docs, lambda i: make_document(seed, i, spec), "kv_{:05d}.bin")


@dataclass(frozen=True)
class Answer:
    """A value token: its offset, key and value (token ids), and the distance back to the value
    token of the key's nearest earlier entry (None at the key's definition)."""

    offset: int
    key: int
    value: int
    distance: int | None


def answers(ids) -> list[Answer]:
    """Every entry's value token in a document's ids (bytes or ints), recomputed from them alone.
    An entry is a key id followed by a value id; anything else (BOS, a stray token) is skipped."""
    ids = np.frombuffer(ids, np.uint8) if isinstance(ids, (bytes, bytearray)) else np.asarray(ids)
    is_key = (ids >= KEY_BASE) & (ids < VALUE_BASE)
    is_value = (ids >= VALUE_BASE) & (ids < VALUE_BASE + 64)
    last: dict[int, int] = {}
    out = []
    for i in np.flatnonzero(is_key[:-1] & is_value[1:]):
        key, offset = int(ids[i]), int(i) + 1
        out.append(Answer(offset, key, int(ids[offset]), offset - last[key] if key in last else None))
        last[key] = offset
    return out


def answer_mask(ids) -> np.ndarray:
    """The training loss's weight of each token of a document (`data.loss_mask=kv_recall_answers`):
    1 on the value of every query (a key seen before), 0 elsewhere."""
    mask = np.zeros(len(ids), np.float32)
    for a in answers(ids):
        if a.distance is not None:
            mask[a.offset] = 1.0
    return mask


def check_document(text: bytes, spec: KVSpec) -> None:
    """Raises ValueError unless the document is all entries, every query repeats its key's first
    value, and every query is near (<= spec.near_max tokens) or far (>= spec.gap)."""
    found = answers(text)
    if len(found) * 2 != len(text) or any(a.offset != 2 * i + 1 for i, a in enumerate(found)):
        raise ValueError("the document is not a run of key-value entries")
    first: dict[int, int] = {}
    for a in found:
        if a.distance is None:
            first[a.key] = a.value
        elif a.value != first[a.key]:
            raise ValueError(f"key {a.key} at token {a.offset} has value {a.value}, defined as {first[a.key]}")
        elif spec.near_max < a.distance < spec.gap:
            raise ValueError(f"key {a.key} at token {a.offset} repeats {a.distance} tokens after its last entry: "
                             f"neither near (<= {spec.near_max}) nor far (>= {spec.gap})")


def recall_accuracy(setup, params, texts: list[bytes], min_distance: int | None = None,
                    buckets: tuple[int, ...] = (), foreign_store: bool = False) -> dict:
    """Accuracy of the argmax prediction on the far answers of `texts` (the key's last entry at
    least `min_distance` tokens back; default the segment plus the XL cache), beside near
    answers and first definitions (chance), optionally by distance bucket: recall.recall_accuracy
    over this task's answers (`foreign_store`: each document reads another's kNN store)."""
    return recall.recall_accuracy(setup, params, texts, min_distance, buckets, answers_fn=answers,
                                  foreign_store=foreign_store)


def spec_dict(spec: KVSpec) -> dict:
    return dataclasses.asdict(spec)
