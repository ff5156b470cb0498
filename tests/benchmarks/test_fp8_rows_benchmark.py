"""benchmarks.fp8_rows: every call it times lowers for CUDA in both columns (the Mosaic row
kernels with the configs its rows name, and the XLA compositions they are timed against)."""

import functools

import jax
import pytest

from benchmarks import fp8_rows

CASES = functools.cache(fp8_rows.cases)  # its arrays drawn once, not once a parameter


@pytest.mark.parametrize("name", list(CASES()))
def test_every_call_lowers_for_cuda_both_ways(name):
    make, args = CASES()[name]
    for impl in ("mosaic", "xla"):
        exported = jax.export.export(jax.jit(make(impl)), platforms=["cuda"])(*args)
        assert ("mosaic_gpu" in exported.mlir_module()) == (impl == "mosaic"
                                                            or "route_scales" in name)
