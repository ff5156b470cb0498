"""benchmarks.kv_scale_granularity models the cache: one scale per row is the cache's own
round trip, and a block's rows share the largest of their scales."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kv_scale_granularity as gran
from jaxattn import kv_quant


def test_per_token_blocks_are_the_caches_round_trip():
    x = gran.rows(jax.random.key(0), 1.0)
    np.testing.assert_array_equal(gran.quantize_blocks(x, 1), kv_quant.dequantize(*kv_quant.quantize(x)))


def test_a_block_shares_its_largest_scale():
    x = jnp.ones((4, 8), jnp.float32).at[0].set(448.0).at[1].set(0.5)
    y = gran.quantize_blocks(x, 2)
    np.testing.assert_array_equal(y[0], 448.0)  # the block's scale is 1: exact
    np.testing.assert_array_equal(y[1], 0.5)  # 0.5 is exact in e4m3 at scale 1 too
    np.testing.assert_array_equal(gran.quantize_blocks(x.at[1].set(0.3), 2)[1], 0.3125)  # rounded


def test_a_static_scale_rounds_every_row_alike():
    x = jnp.array([[0.3, 11.0], [0.003, -181.0 / 16]], jnp.float32)
    # x1: 0.003 is subnormal in e4m3 (steps of 2^-9) and comes back as 2^-8
    np.testing.assert_array_equal(gran.quantize_static(x, 1.0),
                                  [[0.3125, 11.0], [0.00390625, -11.0]])
    # x16: 0.048 is a normal number, 3 significand bits: 1.5 * 2^-5 / 16
    np.testing.assert_array_equal(gran.quantize_static(x, 16.0),
                                  [[0.3125, 11.0], [0.0029296875, -11.0]])
