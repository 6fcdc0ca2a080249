"""The kNN store's choices by name, without JAX: its search backends and key dtypes.

`memtx.config` validates `model.knn.backend` and `model.knn.dtype` against these without
importing the store (memtx/memory/knn.py, which needs JAX); the store imports them from here.
"""

BACKENDS = ("auto", "exact", "approx", "blocked", "bucketed", "chunked")
EXACT_BACKENDS = ("exact", "blocked", "chunked")
TILED_BACKENDS = ("blocked", "bucketed", "chunked")  # never hold the whole queries x slots score matrix
STORE_DTYPES = ("float32", "bfloat16", "int8")
