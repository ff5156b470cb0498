"""The routed experts' grouped matmul: the Mosaic GPU kernel against lax.ragged_dot.

On CPU the kernel runs in Pallas' GPU interpret mode (simulated SMEM, TMA,
wgmma), and is lowered for CUDA at Scout's shapes to check Mosaic lowering and
the shared-memory budget without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.models.llama4 import grouped_matmul as gm


@pytest.mark.parametrize("m,sizes", [
    (1, [0, 0, 0, 1]),  # decode: one row in the last group, three empty ones
    (70, [16, 27, 0, 27]),  # an empty group between unaligned ones
    (200, [0, 200, 0, 0]),  # every row in one group, several row tiles
    (300, [106, 96, 98, 0]),
])
def test_mosaic_kernel_matches_ragged_dot(m, sizes):
    rng = np.random.default_rng(m)
    k, n, g = 128, 256, len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul(x, w, gs, impl="mosaic")
    want = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    # bf16 output rounding only (f32 accumulation in both).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("m", [1, 32, 32768])
@pytest.mark.parametrize("k,n", [(5120, 8192), (8192, 5120)])
def test_mosaic_kernel_lowers_for_scout_shapes(m, k, n):
    """Scout's gate/up (5120 -> 8192) and down (8192 -> 5120) projections, decode to prefill."""
    f = jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl="mosaic"))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((16,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


def test_auto_falls_back_to_xla_off_hopper(monkeypatch):
    x, w = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 128), jnp.bfloat16)
    assert gm.resolve("auto", x, w) == ("mosaic" if gm._on_hopper() else "xla")
    monkeypatch.setenv("JAXATTN_GROUPED_MATMUL", "xla")
    assert gm.resolve("auto", x, w) == "xla"
    with pytest.raises(ValueError, match="impl"):
        gm.resolve("cublas", x, w)
