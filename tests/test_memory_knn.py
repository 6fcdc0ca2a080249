"""The Memorizing Transformer's kNN memory: ring buffer, search backends, resets, the layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import ConfigError, KNNConfig, ModelConfig
from memtx.memory import knn
from memtx.model import TransformerLM, init_memory, segment_nll

BACKENDS = [("exact", {}), ("approx", {}), ("chunked", {"chunk_size": 16}),
            ("blocked", {"chunk_size": 16, "bucket_size": 4})]


class ReferenceStore:
    """Brute-force FIFO per row: a Python list of the newest `size` (key, value) pairs."""

    def __init__(self, batch, size):
        self.rows = [[] for _ in range(batch)]
        self.size = size

    def write(self, keys_BNHD, values_BNHD, num_valid):
        for b, n in enumerate(num_valid):
            for p in range(n):
                self.rows[b].append((keys_BNHD[b, p], values_BNHD[b, p]))
            self.rows[b] = self.rows[b][-self.size:]

    def reset(self, b):
        self.rows[b] = []


def _write_segments(store, ref, rng, segments, B, N, H, D):
    for _ in range(segments):
        keys = rng.standard_normal((B, N, H, D)).astype(np.float32)
        values = rng.standard_normal((B, N, H, D)).astype(np.float32)
        num_valid = rng.integers(0, N + 1, B)
        store = knn.write(store, jnp.asarray(keys), jnp.asarray(values), jnp.asarray(num_valid, jnp.int32))
        ref.write(keys, values, num_valid)
    return store


@pytest.mark.parametrize("size", [5, 24, 100])
@pytest.mark.parametrize("backend,options", BACKENDS)
def test_search_equals_brute_force_over_valid_entries(size, backend, options):
    B, N, H, D, k = 3, 12, 2, 8, 4
    rng = np.random.default_rng(size)
    store, ref = knn.init(B, H, size, D), ReferenceStore(B, size)
    store = _write_segments(store, ref, rng, segments=4, B=B, N=N, H=H, D=D)  # wraps around for small sizes
    queries = rng.standard_normal((B, H, N, D)).astype(np.float32)
    scores, slots, valid = knn.search(store, jnp.asarray(queries), k, backend, **options)
    values = knn.gather(store["values"], slots)
    for b in range(B):
        entries = ref.rows[b]
        assert int(store["count"][b]) == len(entries)
        for h in range(H):
            if not entries:
                assert not np.asarray(valid[b, h]).any()
                continue
            ref_keys = np.stack([key[h] for key, _ in entries])
            ref_values = np.stack([value[h] for _, value in entries])
            ref_scores = queries[b, h] @ ref_keys.T  # [N, entries]
            order = np.argsort(-ref_scores, axis=-1)[:, :k]
            n_valid = min(k, len(entries))
            np.testing.assert_array_equal(np.asarray(valid[b, h]).sum(-1), n_valid)
            np.testing.assert_allclose(np.asarray(scores[b, h, :, :n_valid]),
                                       np.take_along_axis(ref_scores, order, -1)[:, :n_valid], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(values[b, h, :, :n_valid]), ref_values[order][:, :n_valid],
                                       rtol=1e-6)


def test_ring_buffer_keeps_exactly_the_newest_entries_and_never_padding():
    B, N, H, D, S = 2, 7, 1, 1, 10
    store = knn.init(B, H, S, D)
    written = [[], []]
    counter = 1.0
    for num_valid in ([7, 3], [7, 0], [2, 7], [7, 7]):
        values = np.zeros((B, N, H, D), np.float32)
        for b in range(B):
            for p in range(N):
                values[b, p] = counter if p < num_valid[b] else -1.0  # -1 marks padding
                counter += 1
            written[b] += [float(values[b, p, 0, 0]) for p in range(num_valid[b])]
        store = knn.write(store, jnp.asarray(values), jnp.asarray(values), jnp.asarray(num_valid, jnp.int32))
    for b in range(B):
        count = int(store["count"][b])
        stored = np.asarray(store["values"][b, 0, :count, 0])
        assert count == min(S, len(written[b]))
        assert sorted(stored.tolist()) == sorted(written[b][-S:])
        assert -1.0 not in stored.tolist()


def test_reset_empties_one_row_and_touches_no_other():
    rng = np.random.default_rng(0)
    store = _write_segments(knn.init(3, 2, 16, 4), ReferenceStore(3, 16), rng, 3, 3, 8, 2, 4)
    reset = knn.reset_rows(store, jnp.array([False, True, False]))
    assert int(reset["count"][1]) == 0 and int(reset["pointer"][1]) == 0
    for key in ("keys", "values"):
        np.testing.assert_array_equal(reset[key], store[key])  # buffers untouched: O(rows) reset
    for b in (0, 2):
        assert int(reset["count"][b]) == int(store["count"][b])
    _, _, valid = knn.search(reset, jnp.ones((3, 2, 5, 4)), 3)
    assert not np.asarray(valid[1]).any() and np.asarray(valid[0]).all()


def knn_model(size=32, backend="exact", mem_len=8, k=4):
    cfg = ModelConfig(vocab_size=40, vocab_pad_multiple=8, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                      mem_len=mem_len, knn=KNNConfig(enabled=True, layers=(1,), size=size, k=k, backend=backend,
                                                     chunk_size=8))
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), init_memory(cfg, 2),
                        jnp.zeros((2,), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), nn.meta.unbox(params))
    return cfg, model, params


def _batch(tokens, reset):
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens, "targets": (tokens * 7 + 1) % 40, "weights": jnp.ones(tokens.shape),
            "reset": jnp.asarray(reset)}


def test_default_memory_layer_is_the_fourth_from_the_top():
    assert KNNConfig(enabled=True).layer_indices(12) == (8,)  # meliad: index L-4, never the top
    assert KNNConfig(enabled=False).layer_indices(12) == ()
    cfg, _, params = knn_model()
    assert "gate_bias" in params["layer_1"]["attn"] and "gate_bias" not in params["layer_0"]["attn"]


@pytest.mark.parametrize("mem_len", [0, 8])
def test_no_future_leakage_with_knn_memory(mem_len):
    cfg, model, params = knn_model(mem_len=mem_len)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 40, (2, 6)), rng.integers(0, 40, (2, 6))
    changed = second.copy()
    changed[:, 3:] = (changed[:, 3:] + 5) % 40
    _, memory = segment_nll(model, params, init_memory(cfg, 2), _batch(first, [True, True]))
    assert int(memory["knn"]["1"]["count"][0]) == 6  # the first segment is in the store
    nll_a, _ = segment_nll(model, params, memory, _batch(second, [False, False]))
    nll_b, _ = segment_nll(model, params, memory, _batch(changed, [False, False]))
    np.testing.assert_allclose(nll_a[:, :3], nll_b[:, :3], atol=1e-6)
    assert not np.allclose(nll_a[:, 3:], nll_b[:, 3:])


def test_retrieval_changes_the_output_and_empty_memory_is_ignored():
    cfg, model, params = knn_model(mem_len=0)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 40, (2, 6)), rng.integers(0, 40, (2, 6))
    empty = init_memory(cfg, 2)
    _, filled = segment_nll(model, params, empty, _batch(first, [True, True]))
    with_memory, _ = segment_nll(model, params, filled, _batch(second, [False, False]))
    without, _ = segment_nll(model, params, empty, _batch(second, [True, True]))
    assert not np.allclose(with_memory, without)  # the store is read
    # An empty store contributes nothing, whatever its (stale) buffers hold.
    junk = jax.tree.map(lambda x: x, filled)
    junk["knn"]["1"] = knn.reset_rows(filled["knn"]["1"], jnp.array([True, True]))
    junk["xl"] = empty["xl"]
    stale, _ = segment_nll(model, params, junk, _batch(second, [False, False]))
    np.testing.assert_allclose(stale, without, atol=1e-6)


@pytest.mark.slow
def test_gradients_reach_queries_scale_and_gate_but_not_the_store():
    cfg, model, params = knn_model(mem_len=0)
    rng = np.random.default_rng(2)
    _, memory = segment_nll(model, params, init_memory(cfg, 2), _batch(rng.integers(0, 40, (2, 6)), [True, True]))
    batch = _batch(rng.integers(0, 40, (2, 6)), [False, False])

    def loss(params, stored_keys, stored_values):
        store = {**memory["knn"]["1"], "keys": stored_keys, "values": stored_values}
        nll, _ = segment_nll(model, params, {**memory, "knn": {"1": store}}, batch)
        return nll.mean()

    store = memory["knn"]["1"]
    grad_params, grad_keys, grad_values = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, store["keys"], store["values"])
    assert not np.asarray(grad_keys).any() and not np.asarray(grad_values).any()
    attn = grad_params["layer_1"]["attn"]
    assert np.abs(np.asarray(attn["gate_bias"])).min() > 0
    assert np.abs(np.asarray(attn["log_scale"])).min() > 0


@pytest.mark.parametrize("backend", ["approx", "chunked", "blocked"])
def test_backends_give_the_model_the_same_result(backend):
    rng = np.random.default_rng(3)
    segments = [rng.integers(0, 40, (2, 6)) for _ in range(4)]
    results = {}
    for name in ("exact", backend):
        cfg, model, params = knn_model(size=10, backend=name, mem_len=0)  # small: wraps around
        cfg.knn.bucket_size = 2  # blocked: 5 buckets of 2 in tiles of 8 (the second one padded)
        memory = init_memory(cfg, 2)
        out = []
        for s, seg in enumerate(segments):
            nll, memory = segment_nll(model, params, memory, _batch(seg, [s == 0, s == 0]))
            out.append(nll)
        results[name] = np.asarray(out)
    np.testing.assert_allclose(results[backend], results["exact"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,message", [
    ({"k": 64, "size": 32}, "model.knn.k"),
    ({"layers": (5,)}, "model.knn.layers"),
    ({"backend": "faiss"}, "model.knn.backend"),
])
def test_bad_knn_settings_are_one_line_errors(change, message):
    from memtx.config import Config, validate
    cfg = Config()
    cfg.model.knn = KNNConfig(enabled=True, **change)
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, 8)
    assert "\n" not in str(info.value)


def test_memory_too_large_for_the_device_is_reported_before_allocating():
    from memtx import state as state_lib
    from tests.helpers import tiny_config
    cfg = tiny_config()
    cfg.model.knn = KNNConfig(enabled=True, size=2**40)
    with pytest.raises(ConfigError, match="model.knn.size") as info:
        state_lib.build(cfg)  # abstract only: nothing is allocated or compiled before the check
    assert "GiB" in str(info.value) and "\n" not in str(info.value)


def test_bfloat16_store_halves_the_bytes_and_keeps_the_result_close():
    assert knn.state_bytes(2, 4, 1024, 32, "bfloat16") * 2 == knn.state_bytes(2, 4, 1024, 32, "float32")
    rng = np.random.default_rng(4)
    segments = [rng.integers(0, 40, (2, 6)) for _ in range(3)]
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg, model, params = knn_model(size=16, mem_len=0)
        cfg.knn.dtype = dtype
        memory = init_memory(cfg, 2)
        assert memory["knn"]["1"]["keys"].dtype == jnp.dtype(dtype)
        for s, seg in enumerate(segments):
            nll, memory = segment_nll(model, params, memory, _batch(seg, [s == 0, s == 0]))
        results[dtype] = np.asarray(nll)
    np.testing.assert_allclose(results["bfloat16"], results["float32"], rtol=2e-2)
