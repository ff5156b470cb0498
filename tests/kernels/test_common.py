"""What the kernels share (jaxattn.kernels.common) and its re-exports from jaxattn.kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn import kernels
from jaxattn.kernels import common


def test_cdiv_on_ints_and_traced_values():
    assert [common.cdiv(a, 4) for a in (-3, 0, 1, 4, 5)] == [0, 0, 1, 1, 2]
    got = jax.jit(lambda a: common.cdiv(a, 4))(jnp.array([-3, 0, 1, 4, 5], jnp.int32))
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 2])


def test_supported_head_dims_and_dtypes():
    assert kernels.HEAD_DIMS is common.HEAD_DIMS and kernels.DTYPES is common.DTYPES
    assert kernels.supports(128, jnp.bfloat16) and kernels.supports(64, np.float16)
    assert not kernels.supports(96, jnp.bfloat16) and not kernels.supports(64, jnp.float32)
    common.check_supported("prefill", 64, jnp.float16)
    with pytest.raises(ValueError, match="decode kernel.*head_dim"):
        common.check_supported("decode", 96, jnp.bfloat16)
    with pytest.raises(ValueError, match="prefill kernel.*float32"):
        common.check_supported("prefill", 64, jnp.float32)


def test_smem_bytes_rounds_buffers_and_counts_barriers():
    scratch = [plgpu.SMEM((64,), jnp.float32),  # 256 B -> 1 KiB
               None,
               plgpu.SMEM((2, 64, 64), jnp.bfloat16),  # 16 KiB
               plgpu.Barrier(num_arrivals=2, num_barriers=3),
               plgpu.Barrier()]
    assert common.smem_bytes(scratch) == 1024 + 16384 + 8 * 4


def test_device_queries():
    assert kernels.on_hopper is common.on_hopper and kernels.num_sms is common.num_sms
    assert common.num_sms() > 0
    if jax.devices()[0].platform == "cpu":
        assert not common.on_hopper()
