"""JAX's persistent compilation cache: a run's `train.compilation_cache_dir` serves its training,
evaluation and generation (`use`); `memtx.compare` keeps one for all its runs (`within`).

JAX is imported inside the functions: `memtx.compare` imports this module without it.
"""

from __future__ import annotations

import contextlib


def use(directory: str) -> None:
    """The cache in `directory` (local or gs://) from the next compilation on; "": no change. A
    local one that cannot be a writable directory (a file in the way, read-only) is one line:
    JAX would only warn, and the run would silently compile everything again."""
    if directory:
        check_local(directory)
        import jax
        from jax.experimental.compilation_cache import compilation_cache
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # a process that compiled before reads the setting again


def check_local(directory: str) -> None:
    from memtx.errors import ConfigError
    from memtx.workdir_files import output_dir_problem

    problem = None if "://" in directory else output_dir_problem(directory)
    if problem:
        raise ConfigError(f"config key 'train.compilation_cache_dir' ({directory}): {problem}")


@contextlib.contextmanager
def within(path: str):
    """The cache in `path` ("off": none) for the duration: every seed of a config after the first,
    and every evaluation after the first, reuse compiled steps. A cache the user configured is used
    as it is; the setting before is restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    if path == "off" or before:
        yield
        return
    compilation_cache.set_cache_dir(path)
    try:
        yield
    finally:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", before)
