"""Long-context retrieval through an FP8 KV cache: a needle planted deep in a 16k context
(at 5%, 50% and 95% depth) is recovered by a constructed lookup head (tests/needle_cases.py)
reading the cache through ``jaxattn.ragged_paged_attention`` (reference and plan
executor). The per-token-scaled FP8 cache must find every needle with an output close to
the bf16 cache's; a per-tensor-scaled cache loses them (the test can fail)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import kv_quant

from needle_cases import make_needle_case, per_tensor_fp8

CONTEXT = 16384
DEPTHS = (0.05, 0.5, 0.95)


@pytest.fixture(scope="module")
def case():
    return make_needle_case(CONTEXT, DEPTHS)


def _attend(case, k, v, impl, q=None, **scales):
    q = jnp.asarray(case.q if q is None else q, jnp.bfloat16)
    return jaxattn.ragged_paged_attention(q, k, v, *case.args(), bounds=case.bounds, scale=1.0,
                                          impl=impl, **scales)


def _fp8(case):
    k8, ks = kv_quant.quantize_pages(jnp.asarray(case.k_pages))
    v8, vs = kv_quant.quantize_pages(jnp.asarray(case.v_pages))
    return k8, v8, dict(k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("impl", ["reference", "executor"])
def test_needle_recovered_through_fp8_cache(case, impl):
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    exact = np.asarray(_attend(case, bf16(case.k_pages), bf16(case.v_pages), impl),
                       np.float32)[:case.num_seqs]
    np.testing.assert_array_equal(case.read_out(exact), case.answers)  # the head works
    k8, v8, scales = _fp8(case)
    got = np.asarray(_attend(case, k8, v8, impl, **scales), np.float32)[:case.num_seqs]
    np.testing.assert_array_equal(case.read_out(got), case.answers)
    rel = np.linalg.norm(got - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    print(f"needle output relative error, FP8 per-token vs bf16 cache ({impl}): {rel.ravel()}")
    assert rel.max() < 0.05


def test_needle_recovered_with_e4m3_queries_too(case):
    """The prefill kernel over an FP8 cache multiplies S = Q8 K8^T: each query row quantised
    to e4m3 with its own scale (kv_quant's rule), the same numbers the oracle gets here.
    The needles must still be found, and the output stay close to the bf16 cache's."""
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    exact = np.asarray(_attend(case, bf16(case.k_pages), bf16(case.v_pages), "reference"),
                       np.float32)[:case.num_seqs]
    k8, v8, scales = _fp8(case)
    q8, q_scale = kv_quant.quantize(jnp.asarray(case.q, jnp.float32))
    got = np.asarray(_attend(case, k8, v8, "reference", q=kv_quant.dequantize(q8, q_scale),
                             **scales), np.float32)[:case.num_seqs]
    np.testing.assert_array_equal(case.read_out(got), case.answers)
    rel = np.linalg.norm(got - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    print(f"needle output relative error, e4m3 queries and FP8 cache vs bf16: {rel.ravel()}")
    assert rel.max() < 0.05


def test_per_tensor_scale_loses_the_needle(case):
    """The control: the same values with one scale for the whole cache (set by the outlier
    keys) flush ordinary keys to e4m3's subnormals, and the head no longer finds the needles."""
    k = per_tensor_fp8(case.k_pages)
    v = per_tensor_fp8(case.v_pages)
    got = np.asarray(_attend(case, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                             "reference"), np.float32)
    found = case.read_out(got[:case.num_seqs]) == case.answers
    print(f"per-tensor FP8: needles found {found}")
    assert not found.all()
