"""benchmarks.l2_prefetch: every site lowers for CUDA (at a reduced size, as on Hopper)
with and without the prefetch, and the table shows each variant against the first."""

import jax
import pytest

from benchmarks import l2_prefetch as bench
from jaxattn.kernels import common
from jaxattn.kernels.l2_prefetch import L2Prefetch


@pytest.mark.parametrize("real_rows", [1, 8])
def test_every_site_lowers_with_and_without_the_prefetch(monkeypatch, real_rows):
    monkeypatch.setattr(common, "on_hopper", lambda: True)  # the kernels' paths, as on an H200
    for name, value in dict(H=256, I=512, HQ=256, HKV=128, E=4).items():
        monkeypatch.setattr(bench, name, value)
    for site, (fn, rotation) in bench.sites(real_rows).items():
        assert len(rotation) == bench.COPIES
        for config in (None, L2Prefetch()):
            f = jax.jit(lambda sets, c=config, fn=fn: [fn(c, *a) for a in sets])
            mlir = jax.export.export(f, platforms=["cuda"])(tuple(rotation)).mlir_module()
            assert "mosaic_gpu" in mlir, site
            assert ("cp.async.bulk.prefetch" in mlir) == (config is not None), site


def test_table_shows_each_variant_against_the_first():
    res = {"device": "H200", "date": "2026-12-05", "rounds": 5, "rotation": 4, "rows": [
        {"site": "moe", "real_rows": 1, "mib": 0, "device_us": 80.0, "kernel_us": 70.0,
         "vs_first": 1.0},
        {"site": "moe", "real_rows": 1, "mib": 16, "device_us": 76.0, "kernel_us": 66.0,
         "vs_first": 0.95}]}
    md = bench.table(res)
    assert "| moe | 1 | 16 | 76.00 | 66.00 | 0.950 |" in md
