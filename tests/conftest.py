import os

# XLA:CPU runs a program's host callbacks on its intra-op thread pool, one thread per core
# by default. In GPU interpret mode every warpgroup's barrier wait is such a callback and
# blocks its pool thread: on the 2-core CI machine two waiting warpgroups took the whole pool
# and the kernel stalled (four-warpgroup decode kernels every time, three now and then). A
# larger pool (read when the CPU client starts) lets every warpgroup of a CTA wait at once.
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings

from jaxattn import compile_cache
from jaxattn.kernels import on_hopper

settings.register_profile("ci", deadline=None, max_examples=150, print_blob=True)
settings.load_profile("ci")

# JAX's persistent compilation cache (~/.cache/jaxattn/jax-compile, or $JAXATTN_COMPILE_CACHE):
# the xdist workers, the engines the tests build over and over, and the processes the tests
# start (servers, CLIs, the multi-host pair: they inherit the directory through the
# environment) load what another one compiled; a second run recompiles almost nothing.
compile_cache.enable()

# 8 simulated CPU devices in every test process, so tests/sharded (tensor / expert / data
# parallel meshes) runs here, spread over the xdist workers like any other file, instead of
# in one separate 8-device interpreter at the end. Single-device code runs on device 0 as
# it would alone. (The device count is fixed when the backend starts: nothing above has
# touched a device yet.)
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test file. Every XLA:CPU executable keeps a
    few memory maps while it lives, and an xdist worker compiles thousands of programs: past
    the kernel's vm.max_map_count (65,530 by default) the next compile or cache load
    segfaults inside XLA (seen as random crashes late in ``make test``; reproduced with the
    limit lowered to 9,000). What a later file needs again comes back from the persistent
    cache."""
    yield
    jax.clear_caches()


# Files whose tests are independent of each other and each compile their own kernels or
# meshes: xdist hands their tests out one by one (tests that share compilations keep an
# xdist_group mark of their own). Every other file is one unit on one worker (module
# fixtures: servers, runners, models; "runs last in this module" tests; compilations the
# tests share).
SPREAD = {"tests/kernels/test_prefill.py", "tests/kernels/test_decode.py",
          "tests/kernels/test_decode_lowering.py", "tests/kernels/test_fp8_kv.py",
          "tests/test_reference.py", "tests/sharded/test_sharded_model.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a Hopper GPU is (`make gpu`); elsewhere they are skipped.

    Scheduling (``make test``: ``-n 2 --dist loadgroup --no-loadscope-reorder``): one
    xdist group per file (but :data:`SPREAD`), and the files holding a ``slow`` test first,
    so that the long units start at once and the end of the run is short tests filling in.
    """
    def path(item):
        return item.nodeid.split("::")[0]

    slow = {path(item) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: path(item) not in slow)  # stable: file order kept otherwise
    for item in items:
        if path(item) not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(path(item)))
    if on_hopper():
        return
    skip = pytest.mark.skip(reason="needs a Hopper GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
