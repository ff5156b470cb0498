"""JAX's persistent compilation cache, on for server start-ups and the test suite.

Every engine start-up compiles one step per token bucket (and the tests compile hundreds of
small programs); with the cache on, a second start-up of the same configuration loads the
executables from disk instead of recompiling them. XLA keys an entry by the program, the
compile options, the devices and the jax/jaxlib version, so a stale entry is never loaded: a
changed program is a miss.

    from jaxattn import compile_cache
    compile_cache.enable()            # ~/.cache/jaxattn/jax-compile (or $JAXATTN_COMPILE_CACHE)
    compile_cache.enable("/some/dir")
    compile_cache.enable("none")      # off

Processes started from one that enabled the cache (servers, the 8-device test process) use
the same directory: :func:`enable` exports it in ``JAXATTN_COMPILE_CACHE``, which
:func:`default_dir` reads.
"""

from __future__ import annotations

import os

ENV = "JAXATTN_COMPILE_CACHE"
DISABLED = ("", "none", "off", "0", "false")
# An LRU bound (least recently used entries go first). It also turns on JAX's file lock
# around reads and writes: without a bound JAX writes entries in place, unlocked, and a
# process reading an entry another is still writing (two xdist workers compiling the same
# step) would get a truncated executable.
MAX_SIZE = 4 << 30


def default_dir() -> str:
    """``$JAXATTN_COMPILE_CACHE`` if set, else ``jax-compile`` under the jaxattn cache root
    (``$JAXATTN_CACHE_DIR`` or ``~/.cache/jaxattn``: serve.default_model.cache_root's, spelled
    out here because the core does not import the serving layer)."""
    if ENV in os.environ:
        return os.environ[ENV]
    root = os.environ.get("JAXATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "jaxattn")
    return os.path.join(root, "jax-compile")


def enable(path: str | None = None) -> str | None:
    """Cache compiled executables in ``path`` (default :func:`default_dir`); ``"none"`` or
    ``""`` turns the cache off. Returns the directory in use, or None when off.

    Call it before the first compile that should be cached; calling it again with another
    directory switches to that one.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = default_dir() if path is None else path
    if path.strip().lower() in DISABLED:
        os.environ[ENV] = "none"  # children stay off too
        if jax.config.jax_compilation_cache_dir is not None:
            jax.config.update("jax_compilation_cache_dir", None)
            compilation_cache.reset_cache()
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    if jax.config.jax_compilation_cache_dir == path:
        return path
    switching = jax.config.jax_compilation_cache_dir is not None
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program: the defaults keep only those that took >= 1 s to compile, which on the
    # CPU is almost none of them, yet hundreds of 0.2-0.5 s compiles are what a start-up (and
    # the test suite) spends its time on.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_SIZE)
    if switching:
        compilation_cache.reset_cache()  # JAX opens the directory once; reopen at the new one
    return path
