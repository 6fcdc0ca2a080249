"""A synthetic long-range recall task of bytes (`scripts/recall_task.py --task text`); the task
that shows the kNN memory recall is its single-token successor, memtx/data/kv_recall.py.

A document is a log of key-value entries `#KV; ` (an uppercase key, a digit value), with
optional lowercase filler words between entries:

    #Q4; #B7; #Q4; #K0; #B7; ... (much later) #Q4; ...

The first entry of a key *defines* it with a random value; every later entry of that key is a
*query* and repeats the value. At a query the model has read `#K` and must predict V: the match
is content-based (find the earlier position whose preceding bytes were `#K`, read what followed),
the induction pattern a 2-layer model learns, and it is independent of distance.

Queries come in two kinds. *Near* queries repeat a key within `near_max` bytes of its last
entry: local attention can see that entry, so they teach the copy mechanism through local
attention, whose keys and values are exactly what the kNN memory stores. *Far* queries repeat a
key at least `gap` bytes after its last entry; they are the test. A *recalled value token* is a
value byte whose key's nearest earlier entry lies at least `min_distance` bytes back; with
`gap >= min_distance >= N + M` (segment plus XL cache) only the kNN memory can have seen the
value, and a model without it is at chance (one in ten).

Keys are distinct per document and always repeat their value (no stale entries in the memory).
Documents are deterministic in (seed, index) alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import numpy as np

KEY_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_ALPHABET = b"0123456789"
FILLER_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
_ENTRY = re.compile(rb"#([A-Z]+)([0-9]+)[a-z]*;")


@dataclass(frozen=True)
class RecallSpec:
    """The shape of the generated documents (lengths in bytes). The defaults are the task of
    `scripts/recall_task.py --task text`: short documents, one-letter keys, no filler (dense practice)."""

    length: int = 256  # document length (the last entry may run a few bytes over)
    key_len: int = 1  # uppercase letters
    value_len: int = 1  # digits
    define_prob: float = 0.2  # an entry defines a new key (else it queries one)
    far_prob: float = 0.5  # a query is far (when a far key exists; else near, else a definition)
    near_max: int = 28  # a near query's key was last seen at most this far back (not the latest entry)
    gap: int = 48  # a far query's key was last seen at least this far back (>= N + M)
    filler_prob: float = 0.0  # lowercase filler precedes an entry
    filler_words: int = 1  # filler, when present, is 1..filler_words words (uniformly)
    # 0: a far query repeats a random far key. > 0: the far key whose age is nearest a distance
    # drawn log-uniformly from [gap, far_max] (distances spread over decades: the size curve).
    far_max: int = 0
    echo_key: bool = False  # the key follows the value in lowercase: `#KVk; `
    lexicon: int = 0  # filler words come from a per-document list of this many words (0: fresh random words)

    def __post_init__(self):
        if self.length < 1 or self.key_len < 1 or self.value_len < 1 or self.near_max < 1 or self.filler_words < 1 or self.gap <= self.near_max:
            raise ValueError(f"invalid recall spec {self} (gap must exceed near_max)")
        if self.far_max and self.far_max < self.gap:
            raise ValueError(f"recall spec far_max ({self.far_max}) must be 0 or >= gap ({self.gap})")
        for name in ("define_prob", "far_prob", "filler_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recall spec {name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows the format but not the value."""
        return 1.0 / len(VALUE_ALPHABET)


def _random_bytes(rng: np.random.Generator, alphabet: bytes, n: int) -> bytes:
    return bytes(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))


def make_document(seed: int, index: int, spec: RecallSpec = RecallSpec()) -> bytes:
    """Document `index` of the corpus with `seed` (the same bytes whatever the corpus size)."""
    rng = np.random.default_rng([seed, index])
    words = [_random_bytes(rng, FILLER_ALPHABET, int(rng.integers(3, 8))) for _ in range(spec.lexicon)]
    filler = ((lambda: words[int(rng.integers(0, len(words)))]) if words
              else (lambda: _random_bytes(rng, FILLER_ALPHABET, int(rng.integers(2, 8)))))
    out = bytearray()
    value: dict[bytes, bytes] = {}
    last: dict[bytes, int] = {}  # key -> offset of its latest value byte
    previous = None  # the key of the latest entry: a near query never repeats it right away
    while len(out) < spec.length:
        if rng.random() < spec.filler_prob:
            for _ in range(int(rng.integers(1, spec.filler_words + 1))):
                out += filler() + b" "
        at = len(out) + 1 + spec.key_len  # the offset the next entry's value will have
        near = [k for k, o in last.items() if at - o <= spec.near_max and k != previous]
        far = [k for k, o in last.items() if at - o >= spec.gap]
        key = None
        if rng.random() >= spec.define_prob:
            use_far = bool(far) and (not near or rng.random() < spec.far_prob)
            pool = far if use_far else near
            if use_far and spec.far_max:
                target = np.exp(rng.uniform(np.log(spec.gap), np.log(spec.far_max)))
                key = min(far, key=lambda k: abs(np.log((at - last[k]) / target)))
            elif pool:
                key = pool[int(rng.integers(0, len(pool)))]
        if key is None and len(value) == len(KEY_ALPHABET) ** spec.key_len:  # every key is taken
            out += filler() + b" "  # let one age
            continue
        if key is None:  # a definition of a new key
            while key is None or key in value:
                key = _random_bytes(rng, KEY_ALPHABET, spec.key_len)
            value[key] = _random_bytes(rng, VALUE_ALPHABET, spec.value_len)
        out += b"#" + key + value[key] + (key.lower() if spec.echo_key else b"") + b"; "
        last[key], previous = at, key
    return bytes(out)


def write_recall_corpus(directory: str, num_docs: int, seed: int, spec: RecallSpec = RecallSpec()) -> list[str]:
    """Writes `num_docs` documents `recall_00000.txt`, ... into `directory`; returns their paths."""
    return write_documents(directory, num_docs, lambda i: make_document(seed, i, spec), "recall_{:05d}.txt")


def write_documents(directory: str, num_docs: int, make, name: str) -> list[str]:
    """Writes `make(i)` (bytes) as `name.format(i)` into `directory` for i < num_docs; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(num_docs):
        path = os.path.join(directory, name.format(i))
        with open(path, "wb") as f:
            f.write(make(i))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ValueToken:
    """A value byte of a document: its byte offset, the key, the byte, and the distance in bytes
    back to the nearest earlier value byte of the same key (None at a key's first occurrence)."""

    offset: int
    key: bytes
    value: int
    distance: int | None
    index: int = 0  # position in the value


def value_tokens(text: bytes) -> list[ValueToken]:
    """Every `#KV;` value byte of `text`, in order, recomputed from the text alone."""
    last: dict[bytes, int] = {}
    out = []
    for m in _ENTRY.finditer(text):
        key, offset = m.group(1), m.start(2)
        distance = offset - last[key] if key in last else None
        for i in range(m.end(2) - offset):
            out.append(ValueToken(offset + i, key, text[offset + i], distance, i))
        last[key] = offset
    return out


def recall_tokens(text: bytes, min_distance: int) -> list[ValueToken]:
    """The recalled value tokens: a key seen before, its nearest earlier value >= min_distance back."""
    return [t for t in value_tokens(text) if t.distance is not None and t.distance >= min_distance]


def check_document(text: bytes, spec: RecallSpec) -> None:
    """Raises ValueError unless every repeated key repeats its first value, and every repetition is
    either near (<= spec.near_max bytes after the key's last entry) or far (>= spec.gap)."""
    first: dict[tuple[bytes, int], int] = {}
    for t in value_tokens(text):
        if t.distance is None:
            first[t.key, t.index] = t.value
            continue
        if t.value != first.get((t.key, t.index)):
            raise ValueError(f"key {t.key!r} at byte {t.offset} has value {t.value!r}, defined as {first.get((t.key, t.index))!r}")
        if spec.near_max < t.distance < spec.gap:
            raise ValueError(f"key {t.key!r} at byte {t.offset} repeats {t.distance} bytes after its last "
                             f"entry: neither near (<= {spec.near_max}) nor far (>= {spec.gap})")


def score_predictions(text: bytes, predicted: np.ndarray, min_distance: int) -> tuple[int, int]:
    """(correct, total) over the recalled value tokens; `predicted[p]` is the byte predicted at
    offset p (the model's argmax after reading bytes 0..p-1)."""
    tokens = recall_tokens(text, min_distance)
    correct = sum(int(predicted[t.offset]) == t.value for t in tokens)
    return correct, len(tokens)


# ---------------------------------------------------------------------------------------------
# Running a model over documents (imports the model lazily: the generator needs only numpy)


def predict_documents(setup, params, texts: list[bytes], foreign_store: bool = False) -> list[np.ndarray]:
    """Argmax next-byte predictions of every byte of every document, `predicted[p]` for byte p.

    Documents are streamed as in evaluation: `cfg.data.eval_batch_size` rows, one document per
    row, segments of `cfg.data.seq_len`, memory carried within a document and reset at its start.
    `foreign_store` (a control): each row's kNN layers read the store of the next row's document
    (the same segment index of another document) while writing their own; the rest of the
    memory is the row's own.
    """
    import jax
    import jax.numpy as jnp

    from memtx import batch as batch_layout
    from memtx import state as state_lib
    from memtx.data.tokenizer import BOS_ID, PAD_ID
    from memtx.memory import model_memory
    from memtx.step import jit_segment

    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    model = setup.model

    def forward(params, memory, batch):  # a standard batch: inputs, targets, weights, reset
        memory = model_memory.reset_rows(memory, batch["reset"])
        num_valid_B = jnp.sum(batch["weights"] > 0, axis=-1).astype(jnp.int32)
        logits, new_memory = model.apply({"params": params}, batch["inputs"], memory, num_valid_B)
        if foreign_store:  # the same segment again, reading the next row's stores (batch axis 0)
            rolled = {**memory, "knn": jax.tree.map(lambda x: jnp.roll(x, -1, axis=0), memory["knn"])}
            logits, _ = model.apply({"params": params}, batch["inputs"], rolled, num_valid_B)
        return new_memory, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    jitted = jit_segment(setup, forward, setup.batch_sharding)
    memory = state_lib.init_memory_sharded(setup, B)
    predictions: list[np.ndarray] = []
    for start in range(0, len(texts), B):
        group = texts[start:start + B]
        tokens = [np.concatenate([[BOS_ID], np.frombuffer(t, np.uint8).astype(np.int32)]) for t in group]
        # Inputs are [BOS, b_0 .. b_{L-2}]: the prediction at input i is that of byte i.
        lengths = [len(t) - 1 for t in tokens]
        segments = max(-(-n // N) for n in lengths) if lengths else 0
        out = [np.zeros(n, np.int32) for n in lengths]
        for s in range(segments):
            batch = batch_layout.empty(B, N, PAD_ID)  # targets unused: predictions only
            batch["reset"][:] = s == 0
            for row, (t, n) in enumerate(zip(tokens, lengths)):
                m = max(0, min(N, n - s * N))
                batch["inputs"][row, :m] = t[s * N:s * N + m]
                batch["weights"][row, :m] = 1.0
            memory, pred = jitted(params, memory, state_lib.device_batch(setup, batch))
            pred = np.asarray(jax.device_get(pred))
            for row, n in enumerate(lengths):
                m = max(0, min(N, n - s * N))
                out[row][s * N:s * N + m] = pred[row, :m]
        predictions.extend(out)
    return predictions


def recall_accuracy(setup, params, texts: list[bytes], min_distance: int | None = None,
                    buckets: tuple[int, ...] = (), answers_fn=None, foreign_store: bool = False) -> dict:
    """Accuracy of the argmax prediction on the recalled value tokens of `texts`, beside that on
    near queries (whose last entry local attention can see) and on first definitions (which no
    model can predict: chance). With `buckets` (increasing distances in bytes) the recalled
    tokens are also counted by distance: [min_distance, b0), [b0, b1), ..., [b_last, inf).
    `answers_fn(text)`: the scored tokens, each with `offset`, `value` and `distance` (None at a
    definition); default this task's `value_tokens` (memtx/data/kv_recall.py passes its own).
    `foreign_store`: predict_documents' control (each document reads another's kNN store)."""
    cfg = setup.cfg
    if min_distance is None:
        min_distance = cfg.data.seq_len + cfg.model.mem_len
    predictions = predict_documents(setup, params, texts, foreign_store)
    counts = {"far": [0, 0], "near": [0, 0], "first": [0, 0]}
    edges = [min_distance, *(b for b in buckets if b > min_distance), None]
    by_distance = [[0, 0] for _ in edges[:-1]]
    for text, pred in zip(texts, predictions):
        for t in (answers_fn or value_tokens)(text):
            kind = "first" if t.distance is None else "far" if t.distance >= min_distance else "near"
            ok = int(pred[t.offset]) == t.value
            counts[kind][0] += ok
            counts[kind][1] += 1
            if kind == "far":
                i = sum(t.distance >= e for e in edges[1:-1])
                by_distance[i][0] += ok
                by_distance[i][1] += 1
    accuracy = {kind: c / max(n, 1) for kind, (c, n) in counts.items()}
    result = {"accuracy": accuracy["far"], "correct": counts["far"][0], "recalled_tokens": counts["far"][1],
              "near_accuracy": accuracy["near"], "first_definition_accuracy": accuracy["first"],
              "min_distance": min_distance, "documents": len(texts)}
    if buckets:
        result["by_distance"] = [{"min": lo, "max": hi, "correct": c, "tokens": n, "accuracy": c / max(n, 1)}
                                 for lo, hi, (c, n) in zip(edges[:-1], edges[1:], by_distance)]
    return result


def spec_dict(spec: RecallSpec) -> dict:
    return dataclasses.asdict(spec)
