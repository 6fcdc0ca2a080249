"""Test setup: 8 forced CPU devices so sharded code runs on a laptop or CI machine, and one JAX
persistent compilation cache for the whole session, so that a program compiled by one test (or
one subprocess: the settings travel in the environment) is loaded, not compiled, by the next."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs the 8 devices' programs on one thread pool, sized by NPROC (default: max(cores,
# devices) = 8 here). A collective needs a pool thread for each of the 8 devices at once; with
# exactly 8 threads, one thread busy elsewhere leaves the rendezvous short, and after 40 s XLA
# aborts the process ("Termination timeout for collective permute ... only 4 of them arrived"):
# the suite died that way in evaluation steps, three runs of three. Twice the devices has not.
os.environ.setdefault("NPROC", "16")

# The session's compilation cache: MEMTX_TEST_CACHE names a directory to keep between runs (a
# developer's loop); by default a temporary one, removed at the end. Every compilation is cached
# (the default skips those under a second, which are most of this suite's), and JAX reads these
# variables when it is imported, here and in every subprocess a test starts.
# pytest-xdist's workers inherit the directory the main process made (MEMTX_TEST_SESSION_CACHE),
# so that a program one worker compiled is loaded by the other.
_GIVEN = os.environ.get("MEMTX_TEST_CACHE") or os.environ.get("MEMTX_TEST_SESSION_CACHE")
_OWN_CACHE = not _GIVEN
SESSION_CACHE = _GIVEN or tempfile.mkdtemp(prefix="memtx-test-jax-cache-")
os.environ["MEMTX_TEST_SESSION_CACHE"] = SESSION_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# Compilation, not computation, is most of this suite's time: XLA's optimisations off (about 30%
# less time on the compile-bound tests here; every comparison is between programs compiled alike,
# and the cost-analysis tests pass either way). Tests that train long (the recall task) drop it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# hypothesis keeps a cache of constants it found in the code: outside the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "memtx-test-hypothesis"))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests (hypothesis): the same examples on every run (a suite that passes here passes in CI),
# no example database written into the checkout, and no per-example deadline (2 busy cores are slow;
# speed is not what they test). MEMTX_PROPERTY_EXPLORE=1: fresh random examples, ten times as many.
settings.register_profile("memtx", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", database=None, deadline=None, max_examples=1000, print_blob=True)
settings.load_profile("explore" if os.environ.get("MEMTX_PROPERTY_EXPLORE") else "memtx")


def pytest_collection_modifyitems(config, items):
    """Tests marked `tensorflow` run last: TensorFlow, once imported, stays in the process, and the
    rest of the suite (and the model code) must run without it. Tests marked `tpu_presets` (every
    preset compiled for TPU slices, 15-30 minutes) or `accelerator_suite` (the GPU/TPU script run
    small) run only when -m names them: .ci/run's second step."""
    for opt_in in ("tpu_presets", "accelerator_suite"):
        if opt_in in (config.getoption("markexpr") or ""):
            continue
        kept = [item for item in items if item.get_closest_marker(opt_in) is None]
        if len(kept) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = kept
    items.sort(key=lambda item: item.get_closest_marker("tensorflow") is not None)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _session_compilation_cache():
    """Puts the session's cache back after a test that pointed JAX elsewhere (the tests of
    train.compilation_cache_dir and of memtx.compare's cache do)."""
    yield
    import sys
    if "jax" not in sys.modules:
        return
    import jax
    if jax.config.jax_compilation_cache_dir != SESSION_CACHE or not jax.config.jax_enable_compilation_cache:
        from jax.experimental.compilation_cache import compilation_cache
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_compilation_cache_dir", SESSION_CACHE)
        compilation_cache.reset_cache()


@pytest.fixture
def without_session_cache():
    """No persistent compilation cache for the duration of a test (the conftest's is restored
    after it): for tests of memtx's own cache settings, and of what compiles."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    yield
