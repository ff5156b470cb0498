"""benchmarks.read_ceiling: the streaming kernel runs its ring to the end in GPU interpret mode
(every barrier completion observed; interpret mode fails a kernel that leaves one), and every
form the benchmark times lowers for CUDA within shared memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import read_ceiling


@pytest.mark.parametrize("config", [
    read_ceiling.StreamConfig(tiles=8, rows=64, stages=2),
    read_ceiling.StreamConfig(tiles=8, rows=64, stages=3, copies=4),
    read_ceiling.StreamConfig(tiles=16, rows=32, stages=2, swizzle=False),
], ids=lambda c: c.name)
def test_stream_runs_in_interpret_mode(config):
    k = jnp.ones((320, 8, 128), jnp.bfloat16)  # 5 blocks a CTA: the ring wraps
    out = read_ceiling.stream(k, k, config, interpret=True)
    assert np.asarray(out).shape == (config.tiles,)


def test_a_form_that_does_not_divide_the_keys_is_refused():
    k = jnp.ones((100, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not divide"):
        read_ceiling.stream(k, k, read_ceiling.StreamConfig(tiles=8, rows=64))


@pytest.mark.parametrize("config", read_ceiling.forms(), ids=lambda c: c.name)
def test_every_form_lowers_for_cuda(config):
    kv = jax.ShapeDtypeStruct((32 * 8192, 8, 128), jnp.bfloat16)
    exported = jax.export.export(jax.jit(lambda k, v: read_ceiling.stream(k, v, config)),
                                 platforms=["cuda"])(kv, kv)
    assert "mosaic_gpu" in exported.mlir_module()
