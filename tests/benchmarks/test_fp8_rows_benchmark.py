"""benchmarks.fp8_rows: every call it times lowers for CUDA in both columns (the Mosaic row
kernels with the configs its rows name, and the XLA compositions they are timed against)."""

import jax
import pytest

from benchmarks import fp8_rows


@pytest.mark.parametrize("name", list(fp8_rows.cases()))
def test_every_call_lowers_for_cuda_both_ways(name):
    make, args = fp8_rows.cases()[name]
    for impl in ("mosaic", "xla"):
        exported = jax.export.export(jax.jit(make(impl)), platforms=["cuda"])(*args)
        assert ("mosaic_gpu" in exported.mlir_module()) == (impl == "mosaic"
                                                            or "route_scales" in name)
