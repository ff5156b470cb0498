"""The split-KV combine kernel's static choices (its numerics run inside the decode tests:
``test_decode.py`` in GPU interpret mode, ``test_decode_gpu.py`` on a Hopper GPU)."""

import jax.numpy as jnp
import pytest

from jaxattn.kernels import decode_combine


@pytest.mark.parametrize("cols", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_combine_columns_start_every_token_on_128_bytes(cols, dtype, d):
    """A combine CTA's token rows start on 128-byte boundaries (TMA's SMEM alignment) for
    every group size a config can have, and the block is as narrow as that allows."""
    config = decode_combine.CombineConfig(cols=cols)
    for g in range(1, 65):
        cw = decode_combine.combine_columns(config, d, g, dtype)
        assert d % cw == 0 and cw >= min(cols, d), (g, cw)
        assert (g * cw * 2) % 128 == 0 and (g * cw * 4) % 128 == 0, (g, cw)
        # Widened only as far as needed: half as wide would start token 1 off 128 bytes.
        half_bytes = g * (cw // 2) * jnp.dtype(dtype).itemsize
        assert cw == min(cols, d) or half_bytes % 128, (g, cw)
