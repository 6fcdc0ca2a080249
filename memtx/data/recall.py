"""A synthetic long-range recall task: proof that the kNN memory remembers.

Every document is a sequence of *episodes*. An episode defines a few random keys, then a filler
longer than what local attention and the XL cache can see, then asks for the keys again:

    #qmv:K;#bto:R;#qmv:K;...   definitions (some repeated right away: a local copy)
    xkeh uqa pz...             filler of random lowercase "words", `gap` bytes or more
    #bto:R;#qmv:K;...          queries: every key of the episode again, shuffled

A definition and its query are byte-identical (`#key:V;`): the value byte V is random at its
first occurrence and determined by the document at every later one. At a query the model must
predict V after `#key:`; the context it has (`#key:`) is exactly the context of the definition's
value byte. That is the induction pattern a 2-layer model learns: the query at ':' matches the
stored entry of the earlier V whose *preceding* bytes are `#key:`, and that entry's value carries
V. The first-layer output at V (the memory layer's input) holds V and its preceding bytes, so the
match is content-based and independent of distance.

The local copies (`local_repeat`) put an earlier occurrence of a key inside the local window; they
teach the model the copy mechanism through local attention, whose keys and values the kNN
memory stores. They are not scored: a *recalled value token* is a value byte whose key occurred
earlier in the document, with the nearest earlier occurrence at least `min_distance` bytes back.
With min_distance >= N + M (segment length plus XL cache) nothing but the kNN memory can see it.

Keys are distinct within a document (no stale definitions in the memory). Documents are
deterministic in (seed, index) alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import numpy as np

KEY_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
VALUE_ALPHABET = b"0123456789"
FILLER_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
_ENTRY = re.compile(rb"#([a-z]+):(.)")


@dataclass(frozen=True)
class RecallSpec:
    """The shape of the generated documents."""

    episodes: int = 4  # per document
    keys_per_episode: int = 6
    key_len: int = 3  # lowercase letters
    gap: int = 80  # filler bytes between an episode's definitions and its queries (>= N + M)
    local_repeat: float = 0.5  # probability that a definition is repeated right away (local copy)
    value_alphabet: bytes = VALUE_ALPHABET

    def __post_init__(self):
        if self.episodes < 1 or self.keys_per_episode < 1 or self.key_len < 1 or self.gap < 0:
            raise ValueError(f"invalid recall spec {self}")
        if not 0.0 <= self.local_repeat <= 1.0:
            raise ValueError(f"local_repeat must be in [0, 1], got {self.local_repeat}")
        if len(KEY_ALPHABET) ** self.key_len < self.episodes * self.keys_per_episode:
            raise ValueError(f"key_len {self.key_len} has too few keys for {self.episodes} x {self.keys_per_episode}")
        bad = set(self.value_alphabet) & set(b"#:; ")
        if not self.value_alphabet or bad:
            raise ValueError(f"value_alphabet must be non-empty and free of '#', ':', ';' and ' ', got {self.value_alphabet!r}")

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows the format but not the value."""
        return 1.0 / len(set(self.value_alphabet))


def _filler(rng: np.random.Generator, length: int) -> bytes:
    """Random lowercase "words" of 2-7 letters separated by spaces, ending with a space."""
    out = bytearray()
    while len(out) < length:
        word = rng.integers(0, len(FILLER_ALPHABET), int(rng.integers(2, 8)))
        out += bytes(FILLER_ALPHABET[i] for i in word) + b" "
    return bytes(out)


def make_document(seed: int, index: int, spec: RecallSpec = RecallSpec()) -> bytes:
    """Document `index` of the corpus with `seed` (the same bytes whatever the corpus size)."""
    rng = np.random.default_rng([seed, index])
    n_keys = spec.episodes * spec.keys_per_episode
    keys: set[bytes] = set()
    while len(keys) < n_keys:
        keys.add(bytes(KEY_ALPHABET[i] for i in rng.integers(0, len(KEY_ALPHABET), spec.key_len)))
    keys_list = sorted(keys)
    rng.shuffle(keys_list)
    out = bytearray(_filler(rng, int(rng.integers(0, 16))))  # varied phase against segment edges
    for e in range(spec.episodes):
        episode = keys_list[e * spec.keys_per_episode:(e + 1) * spec.keys_per_episode]
        values = {k: spec.value_alphabet[int(rng.integers(0, len(spec.value_alphabet)))] for k in episode}
        for k in episode:
            entry = b"#" + k + b":" + bytes([values[k]]) + b";"
            out += entry
            if rng.random() < spec.local_repeat:
                out += entry
        out += b" " + _filler(rng, spec.gap)
        for i in rng.permutation(len(episode)):
            k = episode[int(i)]
            out += b"#" + k + b":" + bytes([values[k]]) + b";"
        out += b" " + _filler(rng, int(rng.integers(4, 24)))
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


def value_tokens(text: bytes) -> list[ValueToken]:
    """Every `#key:V` value byte of `text`, in order, recomputed from the text alone."""
    last: dict[bytes, int] = {}
    out = []
    for m in _ENTRY.finditer(text):
        key, offset = m.group(1), m.start(2)
        out.append(ValueToken(offset, key, text[offset], offset - last[key] if key in last else None))
        last[key] = offset
    return out


def recall_tokens(text: bytes, min_distance: int) -> list[ValueToken]:
    """The recalled value tokens: a key seen before, its nearest earlier value >= min_distance back."""
    return [t for t in value_tokens(text) if t.distance is not None and t.distance >= min_distance]


def check_document(text: bytes, min_distance: int) -> None:
    """Raises ValueError unless every repeated key repeats its value, and every value byte is either
    a key's first definition, a local copy right after it, or a query at least min_distance back."""
    first: dict[bytes, int] = {}
    for t in value_tokens(text):
        if t.distance is None:
            first[t.key] = t.value
            continue
        if t.value != first[t.key]:
            raise ValueError(f"key {t.key!r} at byte {t.offset} has value {t.value!r}, defined as {first[t.key]!r}")
        if t.distance < min_distance and t.distance != len(t.key) + 4:  # a local copy `#key:V;` apart
            raise ValueError(f"key {t.key!r} at byte {t.offset} repeats only {t.distance} bytes after its last value")


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

    def forward(params, memory, inputs, num_valid, reset):
        memory = model_memory.reset_rows(memory, reset)
        logits, memory = model.apply({"params": params}, inputs, memory, num_valid)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), memory

    mem_sh = state_lib.memory_shardings(setup)
    jitted = jax.jit(forward, in_shardings=(setup.state_shardings["params"], mem_sh, setup.batch_sharding,
                                            setup.row_sharding, setup.row_sharding),
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
            num_valid = np.zeros((B,), np.int32)
            for row, (t, n) in enumerate(zip(tokens, lengths)):
                m = max(0, min(N, n - s * N))
                inputs[row, :m] = t[s * N:s * N + m]
                num_valid[row] = m
            reset = np.full((B,), s == 0)
            batch = state_lib.device_batch(setup, {"inputs": inputs, "num_valid": num_valid, "reset": reset})
            with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules):
                pred, memory = jitted(params, memory, batch["inputs"], batch["num_valid"], batch["reset"])
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
