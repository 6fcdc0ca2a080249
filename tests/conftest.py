"""Test setup: 8 forced CPU devices so sharded code runs on a laptop or CI machine."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs the 8 devices' programs on one thread pool, sized by NPROC (default: max(cores,
# devices) = 8 here). A collective needs a pool thread for each of the 8 devices at once; with
# exactly 8 threads, one thread busy elsewhere leaves the rendezvous short, and after 40 s XLA
# aborts the process ("Termination timeout for collective permute ... only 4 of them arrived"):
# the suite died that way in evaluation steps, three runs of three. Twice the devices has not.
os.environ.setdefault("NPROC", "16")


def pytest_collection_modifyitems(items):
    """Tests marked `tensorflow` run last: TensorFlow, once imported, stays in the process, and the
    rest of the suite (and the model code) must run without it."""
    items.sort(key=lambda item: item.get_closest_marker("tensorflow") is not None)
