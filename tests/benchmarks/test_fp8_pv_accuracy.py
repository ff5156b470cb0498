"""benchmarks.fp8_pv_accuracy: the reference's P rounding is what the e4m3 P.V does, it is in
force only inside ``p_rounded()``, and the comparison reads as documented."""

import jax.numpy as jnp
import numpy as np

from benchmarks import fp8_pv_accuracy as acc
from jaxattn import reference
from jaxattn.kernels import prefill


def test_round_p_e4m3_keeps_four_significant_bits_at_the_kernels_gain():
    p = jnp.asarray(np.random.default_rng(0).uniform(0, 1, 4096), jnp.float32)
    r = np.asarray(acc.round_p_e4m3(p))
    assert np.all(np.abs(r - np.asarray(p)) <= np.asarray(p) * 2.0**-4 + 2.0**-10 / prefill.P8_GAIN)
    assert not np.array_equal(r, np.asarray(p))
    tiny = float(acc.round_p_e4m3(jnp.float32(2.0**-14)))  # normal at the gain: kept
    assert tiny == 2.0**-14


def test_p_rounded_patches_the_reference_only_inside():
    q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 2, 128)), jnp.float32)
    kv = jnp.asarray(np.random.default_rng(2).standard_normal((1, 300, 1, 128)), jnp.float32)
    lens = (jnp.asarray([64]), jnp.asarray([300]))
    run = lambda: np.asarray(reference.attention_reference(q, kv, kv, *lens, 0.1)[0])
    before = run()
    with acc.p_rounded():
        rounded = run()
    np.testing.assert_array_equal(run(), before)
    assert not np.array_equal(rounded, before)
    np.testing.assert_allclose(rounded, before, atol=2e-2)


def test_compare_reads_relative_error_and_agreement():
    ref = np.array([[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]])
    got = np.array([[1.0, 2.7, 2.9], [4.0, 0.4, 1.0]])
    c = acc.compare(got, ref)
    assert np.isclose(c["max_rel_error"], 0.3) and np.isclose(c["mean_rel_error"], 0.2)
    assert c["greedy_agreement"] == 0.5
