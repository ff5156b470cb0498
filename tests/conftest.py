import pytest
from hypothesis import settings

from jaxattn import compile_cache
from jaxattn.kernels import on_hopper

# JAX's persistent compilation cache (~/.cache/jaxattn/jax-compile, or $JAXATTN_COMPILE_CACHE):
# the xdist workers, the engines the tests build over and over, and the processes the tests
# start (servers, the 8-device suite, the multi-host pair: they inherit the directory through
# the environment) load what another one compiled; a second run recompiles almost nothing.
compile_cache.enable()

settings.register_profile("ci", deadline=None, max_examples=150, print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a Hopper GPU is (`make gpu`); elsewhere they are skipped."""
    if on_hopper():
        return
    skip = pytest.mark.skip(reason="needs a Hopper GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
