"""Can jax 0.11.2's Mosaic GPU express P.V as an e4m3 wgmma? (lowering on the CPU, numerics
in interpret mode). A: P [64, 128] f32 -> e4m3, through SMEM or in registers (8-bit wgmma
layout); B: V^T [D=128, 128 keys] e4m3 in SMEM (keys contiguous: K-major, as 8-bit wgmma
operands must be), passed as vt.T."""
import sys
import numpy as np
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F8 = jnp.float8_e4m3fn
M, K, N = 64, 128, 128


def tiled(shape, dtype):
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(128)))


def make(form, interpret):
    def kernel(p_ref, vt_ref, o_ref, p_smem, vt_smem, p32, bar):
        plgpu.copy_gmem_to_smem(vt_ref, vt_smem, bar)
        plgpu.copy_gmem_to_smem(p_ref, p32, bar)
        plgpu.barrier_wait(bar)
        p = plgpu.load(p32, (), layout=plgpu.Layout.WGMMA)  # f32 [64, 128], as S comes
        p8 = p.astype(F8)
        if form == "smem":
            p_smem[...] = p8
            plgpu.commit_smem()
            a = p_smem
        else:
            a = plgpu.layout_cast(p8, plgpu.Layout.WGMMA_8BIT)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, vt_smem.T)
            return acc_ref[...]

        o_ref[...] = pl.run_scoped(body, plgpu.ACC((M, N), jnp.float32))

    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((M, N), jnp.float32),
        scratch_types=[tiled((M, K), F8), tiled((N, K), F8), plgpu.SMEM((M, K), jnp.float32),
                       plgpu.Barrier(num_arrivals=2)],
        interpret=plgpu.InterpretGPUParams() if interpret else None)


S = jax.ShapeDtypeStruct
for form in ("smem", "regs"):
    try:
        exp = jax.export.export(jax.jit(make(form, False)), platforms=["cuda"])(
            S((M, K), jnp.float32), S((N, K), F8))
        print(form, "lowers:", "mosaic_gpu" in exp.mlir_module())
    except Exception as e:  # noqa: BLE001
        print(form, "does not lower:", type(e).__name__, str(e).splitlines()[0][:300])
rng = np.random.default_rng(0)
p = rng.uniform(0, 1, (M, K)).astype(np.float32)
v = rng.standard_normal((K, N)).astype(np.float32)
vt8 = jnp.asarray(v.T).astype(F8)
want = np.asarray(jnp.asarray(p).astype(F8), np.float32) @ np.asarray(vt8, np.float32).T
try:
    got = np.asarray(make("smem", True)(jnp.asarray(p), vt8))
    print("interpret smem: max abs err vs f32 matmul of the e4m3 operands",
          float(np.abs(got - want).max()), "scale", float(np.abs(want).max()))
except Exception as e:  # noqa: BLE001
    print("interpret smem fails:", type(e).__name__, str(e).splitlines()[0][:300])
