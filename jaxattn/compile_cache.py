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

Processes started from one that enabled the cache (the servers and CLIs the tests start)
use the same directory: :func:`enable` exports it in ``JAXATTN_COMPILE_CACHE``, which
:func:`default_dir` reads.
"""

from __future__ import annotations

import os

ENV = "JAXATTN_COMPILE_CACHE"
DISABLED = ("", "none", "off", "0", "false")
# The directory is trimmed to PRUNE_TO of this, least recently used entries first, when a
# process enables the cache and finds it larger. (Not JAX's own bound,
# jax_compilation_cache_max_size: with it set JAX rescans the whole directory under a
# file lock on every write, ~0.1 s per entry at a few thousand entries, more than most of
# these programs take to compile. Unbounded, JAX writes entries unlocked; a process that
# reads an entry another is still writing fails to decompress it, warns and compiles.)
MAX_BYTES = 2 << 30
PRUNE_TO = 0.5


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
    directory switches to that one. With ``path=None``, a cache the process already has
    (``JAX_COMPILATION_CACHE_DIR``, a ``jax.config`` set by the caller) is kept as it is.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if path is None and jax.config.jax_compilation_cache_dir is not None:
        return jax.config.jax_compilation_cache_dir
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
    jax.config.update("jax_compilation_cache_max_size", -1)  # see MAX_BYTES
    if switching:
        compilation_cache.reset_cache()  # JAX opens the directory once; reopen at the new one
    prune(path)
    return path


def prune(path: str, max_bytes: int = MAX_BYTES) -> int:
    """Delete the least recently used entries of a cache directory larger than ``max_bytes``
    until it is down to ``PRUNE_TO`` of it; returns the bytes deleted. (An entry another
    process is reading at that moment is a miss there: it compiles.)"""
    entries, total = [], 0
    with os.scandir(path) as it:
        for e in it:
            try:
                st = e.stat()
            except FileNotFoundError:  # deleted by another process meanwhile
                continue
            if e.is_file():
                entries.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
                total += st.st_size
    if total <= max_bytes:
        return 0
    freed = 0
    for _, size, file in sorted(entries):
        if total - freed <= max_bytes * PRUNE_TO:
            break
        try:
            os.remove(file)
            freed += size
        except FileNotFoundError:
            pass
    return freed
