"""As w8a16_probe.py, a [128, 256] FP8 tile (the decode pick's slot) converted to f16 in
128-element K chunks per 64-row half: the wgmma per chunk, A from registers."""
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BN, BM, BK, CK = 128, 16, 256, 128
T16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
T8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))

def body(w_gmem, x_gmem, o_gmem, w_smem, x_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(w_gmem, w_smem, bar)
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
    plgpu.barrier_wait(bar)
    def acc_scope(acc_ref):
        for h in range(BN // 64):
            for c in range(BK // CK):
                w16 = plgpu.load(w_smem.at[pl.ds(h * 64, 64), pl.ds(c * CK, CK)], (),
                                 layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float16)
                plgpu.wgmma(acc_ref.at[pl.ds(h * 64, 64)], w16, x_smem.at[:, pl.ds(c * CK, CK)].T)
        return acc_ref[...]
    acc = pl.run_scoped(acc_scope, plgpu.ACC((BN, BM)))
    o_smem.T[...] = acc.astype(jnp.float16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)

f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((BM, BN), jnp.float16),
                 scratch_types=[plgpu.SMEM((BN, BK), jnp.float8_e4m3fn, transforms=T8),
                                plgpu.SMEM((BM, BK), jnp.float16, transforms=T16),
                                plgpu.SMEM((BM, BN), jnp.float16),
                                plgpu.Barrier(num_arrivals=2)])
w = jax.ShapeDtypeStruct((BN, BK), jnp.float8_e4m3fn)
x = jax.ShapeDtypeStruct((BM, BK), jnp.float16)
try:
    exp = jax.export.export(jax.jit(f), platforms=["cuda"])(w, x)
    print("LOWERED", exp.mlir_module().count("mosaic_gpu"))
except Exception as e:
    print("FAIL", type(e).__name__, str(e)[:1500])
