"""benchmarks.decode_variants: every variant is a configuration the kernel builds for its
cache (CUDA lowering on the CPU), and the table shows each against the baseline."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from benchmarks import decode_variants

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "kernels")]  # the kernels' lowering helpers
from test_decode_lowering import _export  # noqa: E402
from test_fp8_kv import _export_decode  # noqa: E402


@pytest.mark.parametrize("name", list(decode_variants.variants()))
def test_every_variant_lowers_for_its_cache(name):
    cache, config = decode_variants.variants()[name]
    bounds = jaxattn.Bounds(max_num_seqs=32, max_num_batched_tokens=32, max_model_len=131072,
                            page_size=32, num_q_heads=40, num_kv_heads=8, head_dim=128,
                            chunk_size=8192)
    if cache == "bf16":
        exported = _export(bounds, jnp.bfloat16, config=config)
    else:  # "fp8_fixed": told one K and one V scale
        fixed = {}
        if cache == "fp8_fixed":
            fixed = dict(fixed_k_scale=2.0 ** -5, fixed_v_scale=2.0 ** -3)
        exported = _export_decode(bounds, jnp.bfloat16, config=config, **fixed)
    assert "mosaic_gpu" in exported.mlir_module()


def test_fixed_cache_holds_normed_keys_and_values_under_one_scale_each():
    k = jax.random.normal(jax.random.key(0), (4, 32, 8, 128), jnp.bfloat16)
    (k8, v8, ks, vs), told = decode_variants.fixed_scales(k, k * 3)
    assert (np.asarray(ks) == told["fixed_k_scale"]).all()
    assert (np.asarray(vs) == told["fixed_v_scale"]).all()
    v = np.asarray(k * 3, np.float32)
    np.testing.assert_allclose(np.asarray(v8, np.float32) * told["fixed_v_scale"], v,
                               rtol=2.0**-4, atol=2.0**-9 * told["fixed_v_scale"])


def test_table_shows_every_variant_and_a_failed_one():
    names = list(decode_variants.variants())
    row = dict(batch=32, ctx=8192, over_baseline={n: 1.0 for n in names[:-1]},
               max_abs_diff={n: 0.0 for n in names[:-1]})
    md = decode_variants.markdown(dict(device="H200", date="d", variants=names, rows=[row]))
    assert md.count("\n| ") == len(names) + 1  # header and one line per variant
    assert f"| {names[-1]} | error |" in md
