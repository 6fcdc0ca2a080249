"""Test setup: 8 forced CPU devices so sharded code runs on a laptop or CI machine."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(items):
    """Tests marked `tensorflow` run last: TensorFlow, once imported, stays in the process, and the
    rest of the suite (and the model code) must run without it."""
    items.sort(key=lambda item: item.get_closest_marker("tensorflow") is not None)
