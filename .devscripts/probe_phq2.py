import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
BM, H = 16, 40
def variants():
    def gmem_strided(acc_gmem, s_gmem, out_gmem, a_smem, bar):
        plgpu.copy_gmem_to_smem(acc_gmem, a_smem, bar); plgpu.barrier_wait(bar)
        acc = plgpu.load(a_smem, (), layout=plgpu.Layout.WGMMA)
        rows = plgpu.load(s_gmem.at[:, 7 * 8], (), layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
        a_smem[...] = acc * lax.broadcast_in_dim(rows, acc.shape, [1])
        plgpu.commit_smem(); plgpu.copy_smem_to_gmem(a_smem, out_gmem); plgpu.wait_smem_to_gmem(0)
    def smem_unswizzled_2d(acc_gmem, s_gmem, out_gmem, a_smem, bar):
        # per head: [BM, 8] -> max over lanes -> [BM] vector
        @pl.run_scoped(s_smem=plgpu.SMEM((BM, H * 8), jnp.float32))
        def _(s_smem):
            plgpu.copy_gmem_to_smem(s_gmem, s_smem, bar); plgpu.copy_gmem_to_smem(acc_gmem, a_smem, bar)
            plgpu.barrier_wait(bar)
            acc = plgpu.load(a_smem, (), layout=plgpu.Layout.WGMMA)
            blk = plgpu.load(s_smem.at[:, pl.ds(7 * 8, 8)], (), layout=plgpu.Layout.WG_STRIDED((BM, 8), vec_size=1), optimized=False)
            rows = plgpu.layout_cast(jnp.max(blk, axis=1), plgpu.Layout.WGMMA.reduce(0))
            a_smem[...] = acc * lax.broadcast_in_dim(rows, acc.shape, [1])
            plgpu.commit_smem(); plgpu.copy_smem_to_gmem(a_smem, out_gmem); plgpu.wait_smem_to_gmem(0)
    return dict(gmem_strided=(gmem_strided, 1), smem_unswizzled_2d=(smem_unswizzled_2d, 2))
acc = jnp.asarray(np.random.default_rng(1).standard_normal((64, BM)), jnp.float32)
s = jnp.asarray(np.random.default_rng(2).random((BM, H * 8)), jnp.float32)
want = np.asarray(acc) * np.asarray(s)[:, 56][None, :]
for name, (kern, arr) in variants().items():
    f = plgpu.kernel(kern, out_type=jax.ShapeDtypeStruct((64, BM), jnp.float32),
                     scratch_types=(plgpu.SMEM((64, BM), jnp.float32), plgpu.Barrier(num_arrivals=arr)),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    try:
        jax.export.export(jax.jit(f), platforms=["cuda"])(acc, s); print(name, "lowers")
    except Exception as e:
        print(name, "export FAILED:", type(e).__name__, str(e)[:400])
    try:
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            out = jax.jit(f)(acc, s)
        print(name, "interpret ok", np.allclose(np.asarray(out), want))
    except Exception as e:
        print(name, "interpret FAILED:", type(e).__name__, str(e)[:300])
