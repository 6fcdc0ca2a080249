"""The tiled kNN search backends (memtx/memory/knn.py) against lax.top_k over the whole score
matrix: `blocked` returns the same neighbours in the same order, ties included; `bucketed` meets
its recall target; low-precision stores keep recall@k >= 0.95."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.memory import knn


def _store(keys_BHSD, count_B, dtype="float32"):
    B, H, S, D = keys_BHSD.shape
    store = knn.init(B, H, S, D, dtype)
    return {**store, "keys": knn.quantize_keys(jnp.asarray(keys_BHSD), store["keys"].dtype),
            "count": jnp.asarray(count_B, jnp.int32)}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("size,chunk,bucket", [(64, 16, 4), (100, 32, 8), (300, 64, 4), (257, 1000, 16)])
def test_blocked_returns_exactly_the_neighbours_of_lax_top_k(size, chunk, bucket):
    """Same slots in the same order as `exact`, with partly filled rows, a store that is not a
    whole number of tiles or buckets, and exact ties (duplicated keys)."""
    B, H, N, D, k = 3, 2, 10, 8, 6
    rng = np.random.default_rng(size)
    keys = rng.standard_normal((B, H, size, D)).astype(np.float32)
    keys[:, :, size // 2: size // 2 + 5] = keys[:, :, 3:8]  # equal keys: equal scores, order by slot
    queries = jnp.asarray(rng.standard_normal((B, H, N, D)).astype(np.float32))
    store = _store(keys, [size, size // 3, 4])  # row 2 has fewer entries than k
    exact = knn.search(store, queries, k, "exact")
    blocked = jax.jit(functools.partial(knn.search, k=k, backend="blocked", chunk_size=chunk,
                                        bucket_size=bucket))(store, queries)
    np.testing.assert_array_equal(blocked[2], exact[2])
    valid = np.asarray(exact[2])
    assert valid.sum() == B * H * N * k - H * N * (k - 4)  # the short row: 4 valid neighbours
    np.testing.assert_array_equal(np.where(valid, blocked[1], -1), np.where(valid, exact[1], -1))
    # The scores agree to float rounding (a tile's matmul may round differently from the whole one's).
    np.testing.assert_allclose(np.where(valid, blocked[0], 0), np.where(valid, exact[0], 0), rtol=1e-6, atol=1e-6)
    assert int(np.asarray(blocked[1]).max()) < size  # invalid entries never point past the store


@pytest.mark.parametrize("k,target", [(8, 0.9), (16, 0.95)])
def test_bucketed_meets_its_recall_target_and_is_not_exact(k, target):
    B, H, N, D, S = 2, 2, 64, 16, 4096
    rng = np.random.default_rng(k)
    store = _store(_unit(rng.standard_normal((B, H, S, D))).astype(np.float32), [S, S])
    queries = jnp.asarray(_unit(rng.standard_normal((B, H, N, D))).astype(np.float32))
    exact = knn.search(store, queries, k, "exact")
    bucketed = knn.search(store, queries, k, "bucketed", recall_target=target, chunk_size=512)
    recall = knn.recall(exact, bucketed)
    assert target <= recall < 1.0, recall  # below 1: the approximation really ran
    assert knn.bucket_count(k, target) < S


def test_bucket_count_grows_with_the_recall_target():
    counts = [knn.bucket_count(32, r) for r in (0.8, 0.9, 0.95, 0.99)]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert all(1 - 31 / (2 * L) >= r for L, r in zip(counts, (0.8, 0.9, 0.95, 0.99)))


def test_low_precision_stores_keep_recall_and_shrink_the_bytes():
    B, H, N, D, S, k = 2, 2, 64, 32, 2048, 32
    rng = np.random.default_rng(7)
    keys = _unit(rng.standard_normal((B, H, S, D))).astype(np.float32)
    queries = jnp.asarray(_unit(rng.standard_normal((B, H, N, D))).astype(np.float32))
    exact = knn.search(_store(keys, [S, S]), queries, k, "exact")
    for dtype in ("bfloat16", "int8"):
        store = _store(keys, [S, S], dtype)
        for backend in ("exact", "blocked"):
            assert knn.recall(exact, knn.search(store, queries, k, backend, chunk_size=512)) >= 0.95, (dtype, backend)
    stored = _store(keys, [S, S], "int8")
    assert stored["keys"].dtype == jnp.int8 and stored["values"].dtype == jnp.bfloat16
    np.testing.assert_allclose(knn.stored_keys(stored["keys"], jnp.float32), keys, atol=0.5 / 127 + 1e-7)
    assert knn.state_bytes(2, 4, 1024, 32, "int8") * 8 == knn.state_bytes(2, 4, 1024, 32, "float32") * 3


def test_auto_backend_is_approx_on_tpu_and_exact_neighbours_elsewhere(monkeypatch):
    """`auto` stands for approx on TPU and, elsewhere, exact up to AUTO_EXACT_MAX_SLOTS slots and
    blocked above; on this CPU its neighbours are lax.top_k's on either side of the threshold."""
    limit = knn.AUTO_EXACT_MAX_SLOTS
    assert knn.resolve_backend("auto", limit, "tpu") == knn.resolve_backend("auto", 10 * limit, "tpu") == "approx"
    for platform in ("gpu", "cpu"):
        assert knn.resolve_backend("auto", limit, platform) == "exact"
        assert knn.resolve_backend("auto", limit + 1, platform) == "blocked"
    assert knn.resolve_backend("bucketed", 10, "tpu") == "bucketed"  # a named backend stands for itself
    monkeypatch.setattr(knn, "AUTO_EXACT_MAX_SLOTS", 64)  # the two sides at test size
    rng = np.random.default_rng(3)
    queries = jnp.asarray(rng.standard_normal((2, 2, 5, 8)).astype(np.float32))
    for size in (64, 200):
        store = _store(rng.standard_normal((2, 2, size, 8)).astype(np.float32), [size, size // 2])
        assert knn.resolve_backend("auto", size) == ("exact" if size == 64 else "blocked")
        np.testing.assert_array_equal(knn.search(store, queries, 4, "auto", bucket_size=4)[1],
                                      knn.search(store, queries, 4, "exact")[1])
