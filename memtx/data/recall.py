"""A synthetic long-range recall task: proof that the kNN memory remembers.

A document is a log of key-value entries `#key:V;` (a key of lowercase letters, a one-byte value)
with random lowercase filler words between some of them:

    #qmv:4; #bto:7; xkeh uqa #qmv:4; #kfa:0; pz #bto:7; ... (much later) #qmv:4;

The first entry of a key *defines* it with a random value; every later entry of that key is a
*query* and repeats the value. A query is byte-identical to its definition, so at a query the
model has read `#key:` and must predict V, with exactly the context that preceded the
definition's value byte. That is the induction pattern a 2-layer model learns: the query at ':'
matches the stored entry of the earlier V whose *preceding* bytes are `#key:`, and that entry's
value carries V. The memory layer's input at V (the first layer's output) holds V and the bytes
before it, so the match is content-based and independent of distance.

Queries come in two kinds. *Near* queries repeat a key within `near_max` bytes of its last
entry: local attention can see that entry, so they teach the model the copy mechanism through
local attention, whose keys and values are exactly what the kNN memory stores. *Far* queries
repeat a key at least `gap` bytes after its last entry; they are the test. A *recalled value token*
is a value byte whose key occurred earlier in the document, the nearest earlier occurrence at
least `min_distance` bytes back; with `gap >= min_distance >= N + M` (segment length plus XL
cache) only the kNN memory can have seen the value, and a model without it is at chance.

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
_ENTRY = re.compile(rb"#([A-Z]+)([^A-Z#; ]+)")


@dataclass(frozen=True)
class RecallSpec:
    """The shape of the generated documents (lengths in bytes)."""

    length: int = 1024  # document length (the last entry may run a few bytes over)
    min_length: int = 0  # > 0: each document's length is drawn uniformly from [min_length, length]
    key_len: int = 2  # uppercase letters
    define_prob: float = 0.3  # an entry defines a new key (else it queries one)
    far_prob: float = 0.5  # a query is far (when a far key is available; else near, else a definition)
    near_max: int = 28  # a near query's key was last seen at most this far back (not the latest entry)
    gap: int = 48  # a far query's key was last seen at least this far back (>= N + M)
    filler_prob: float = 0.4  # a filler word precedes an entry
    mode: str = "near_far"  # near_far | zipf (query the key used r entries ago with weight 1/r^zipf_alpha)
    zipf_alpha: float = 1.0
    echo: bool = False  # entries are `#KVK;`: the key again after the value
    filler_repeat: bool = False  # a filler is a phrase of 1-3 words written twice (dense induction practice)
    filler_alternate: bool = False  # a filler word alternates two random letters: `qzqzqzq`
    filler_vocab: int = 0  # > 0: filler words come from a fixed list of this many words (trigram statistics)
    value_alphabet: bytes = VALUE_ALPHABET
    value_len: int = 1

    def __post_init__(self):
        if self.length < 1 or self.key_len < 1 or self.near_max < 1 or self.gap <= self.near_max:
            raise ValueError(f"invalid recall spec {self} (gap must exceed near_max)")
        for name in ("define_prob", "far_prob", "filler_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recall spec {name} must be in [0, 1], got {getattr(self, name)}")
        bad = set(self.value_alphabet) & set(b"#; " + KEY_ALPHABET)
        if not self.value_alphabet or bad:
            raise ValueError(f"value_alphabet must be non-empty and free of '#', ':', ';' and ' ', "
                             f"got {self.value_alphabet!r}")

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows the format but not the value."""
        return 1.0 / len(set(self.value_alphabet))


def _word(rng: np.random.Generator) -> bytes:
    """A random lowercase "word" of 2-7 letters and a space."""
    return bytes(FILLER_ALPHABET[i] for i in rng.integers(0, len(FILLER_ALPHABET), int(rng.integers(2, 8)))) + b" "


def _vocabulary(size: int) -> list[bytes]:
    """A fixed list of random lowercase words (the same for every seed), each with a space."""
    rng = np.random.default_rng(1234567)
    return [_word(rng) for _ in range(size)]


def make_document(seed: int, index: int, spec: RecallSpec = RecallSpec()) -> bytes:
    """Document `index` of the corpus with `seed` (the same bytes whatever the corpus size)."""
    rng = np.random.default_rng([seed, index])
    out = bytearray()
    value: dict[bytes, bytes] = {}
    last: dict[bytes, int] = {}  # key -> offset of its latest value byte
    previous = None  # the key of the latest entry: a near query never repeats it right away
    length = int(rng.integers(spec.min_length, spec.length + 1)) if spec.min_length else spec.length
    while len(out) < length:
        if rng.random() < spec.filler_prob:
            if spec.filler_vocab:
                words = _vocabulary(spec.filler_vocab)
                out += b"".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 4))))
            elif spec.filler_alternate:
                pair = bytes(FILLER_ALPHABET[i] for i in rng.choice(len(FILLER_ALPHABET), 2, replace=False))
                out += (pair * 8)[:int(rng.integers(4, 13))] + b" "
            elif spec.filler_repeat:
                phrase = b"".join(_word(rng) for _ in range(int(rng.integers(1, 4))))
                out += phrase + phrase
            else:
                out += _word(rng)
        at = len(out) + spec.key_len + 1  # offset the value byte of the next entry will have
        near = [k for k, o in last.items() if at - o <= spec.near_max and k != previous]
        far = [k for k, o in last.items() if at - o >= spec.gap]
        key = None
        if spec.mode == "zipf":
            if rng.random() >= spec.define_prob and len(last) > 1:
                order = sorted((k for k in last if k != previous), key=lambda k: -last[k])
                w = 1.0 / np.arange(1, len(order) + 1) ** spec.zipf_alpha
                key = order[int(rng.choice(len(order), p=w / w.sum()))]
        elif rng.random() >= spec.define_prob:
            pool = far if (far and (not near or rng.random() < spec.far_prob)) else near
            if pool:
                key = pool[int(rng.integers(0, len(pool)))]
        if key is None and len(value) == len(KEY_ALPHABET) ** spec.key_len:  # every key is taken
            out += _word(rng)  # wait for a key to become near or far
            continue
        if key is None:  # a definition of a new key
            while key is None or key in value:
                key = bytes(KEY_ALPHABET[i] for i in rng.integers(0, len(KEY_ALPHABET), spec.key_len))
            value[key] = bytes(spec.value_alphabet[int(i)] for i in rng.integers(0, len(spec.value_alphabet), spec.value_len))
        out += b"#" + key + value[key] + (key if spec.echo else b"") + b"; "
        last[key], previous = at, key
    return bytes(out)


def write_recall_corpus(directory: str, num_docs: int, seed: int, spec: RecallSpec = RecallSpec()) -> list[str]:
    """Writes `num_docs` documents `recall_00000.txt`, ... into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(num_docs):
        path = os.path.join(directory, f"recall_{i:05d}.txt")
        with open(path, "wb") as f:
            f.write(make_document(seed, i, spec))
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
    """Every `#key:V` value byte of `text`, in order, recomputed from the text alone."""
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


def predict_documents(setup, params, texts: list[bytes]) -> list[np.ndarray]:
    """Argmax next-byte predictions of every byte of every document, `predicted[p]` for byte p.

    Documents are streamed as in evaluation: `cfg.data.eval_batch_size` rows, one document per
    row, segments of `cfg.data.seq_len`, memory carried within a document and reset at its start.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from memtx import sharding
    from memtx import state as state_lib
    from memtx.data.tokenizer import BOS_ID, PAD_ID
    from memtx.memory import model_memory

    cfg = setup.cfg
    B, N = cfg.data.eval_batch_size, cfg.data.seq_len
    model = setup.model

    def forward(params, memory, batch):  # a standard batch: inputs, targets, weights, reset
        memory = model_memory.reset_rows(memory, batch["reset"])
        num_valid_B = jnp.sum(batch["weights"] > 0, axis=-1).astype(jnp.int32)
        logits, memory = model.apply({"params": params}, batch["inputs"], memory, num_valid_B)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), memory

    mem_sh = state_lib.memory_shardings(setup)
    batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding,
                "weights": setup.batch_sharding, "reset": setup.row_sharding}
    jitted = jax.jit(forward, in_shardings=(setup.state_shardings["params"], mem_sh, batch_sh),
                     out_shardings=(setup.batch_sharding, mem_sh), donate_argnums=(1,))
    rules = sharding.rules(cfg)
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
            inputs = np.full((B, N), PAD_ID, np.int32)
            weights = np.zeros((B, N), np.float32)
            for row, (t, n) in enumerate(zip(tokens, lengths)):
                m = max(0, min(N, n - s * N))
                inputs[row, :m] = t[s * N:s * N + m]
                weights[row, :m] = 1.0
            batch = {"inputs": inputs, "targets": inputs, "weights": weights, "reset": np.full((B,), s == 0)}
            with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules):
                pred, memory = jitted(params, memory, state_lib.device_batch(setup, batch))
            pred = np.asarray(jax.device_get(pred))
            for row, n in enumerate(lengths):
                m = max(0, min(N, n - s * N))
                out[row][s * N:s * N + m] = pred[row, :m]
        predictions.extend(out)
    return predictions


def recall_accuracy(setup, params, texts: list[bytes], min_distance: int | None = None) -> dict:
    """Accuracy of the argmax prediction on the recalled value tokens of `texts` (and on first
    definitions, for comparison: those are unpredictable for any model)."""
    cfg = setup.cfg
    if min_distance is None:
        min_distance = cfg.data.seq_len + cfg.model.mem_len
    predictions = predict_documents(setup, params, texts)
    correct = total = first_correct = first_total = 0
    for text, pred in zip(texts, predictions):
        c, n = score_predictions(text, pred, min_distance)
        correct, total = correct + c, total + n
        for t in value_tokens(text):
            if t.distance is None:
                first_correct += int(pred[t.offset]) == t.value
                first_total += 1
    return {"accuracy": correct / max(total, 1), "correct": correct, "recalled_tokens": total,
            "first_definition_accuracy": first_correct / max(first_total, 1), "min_distance": min_distance,
            "documents": len(texts)}


def spec_dict(spec: RecallSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["value_alphabet"] = spec.value_alphabet.decode()
    return d
