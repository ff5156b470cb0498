"""Probe: do the Mosaic pieces of per-head FP8 attention output lower for CUDA (and run in
GPU interpret mode)?"""
import sys
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

G, D, T = 5, 128, 4
F8 = jnp.float8_e4m3fn

def quant_kernel(x_gmem, o_gmem, s_gmem, x_smem, o_smem, s_smem, bar):
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
    plgpu.barrier_wait(bar)
    x = plgpu.load(x_smem, (), layout=plgpu.Layout.WGMMA)
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = jnp.maximum(amax / 448.0, 1e-12)
    q = jnp.clip(x / lax.broadcast_in_dim(scale, x.shape, [0]), -448.0, 448.0).astype(F8)
    o_smem[...] = q
    s_smem[...] = lax.broadcast_in_dim(scale, (64, 8), [0])
    plgpu.commit_smem()
    for tok in range(T):
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(tok * G, G)], o_gmem.at[tok])
        plgpu.copy_smem_to_gmem(s_smem.at[pl.ds(tok * G, G)], s_gmem.at[tok])
    plgpu.wait_smem_to_gmem(0)

from jax import lax

def run_quant(x):
    k = plgpu.kernel(quant_kernel,
                     out_type=(jax.ShapeDtypeStruct((T, G, D), F8),
                               jax.ShapeDtypeStruct((T, G, 8), jnp.float32)),
                     scratch_types=(plgpu.SMEM((64, D), jnp.float32), plgpu.SMEM((64, D), F8),
                                    plgpu.SMEM((64, 8), jnp.float32), plgpu.Barrier()),
                     compiler_params=plgpu.CompilerParams(
                         lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return k(x)

BM, H = 16, 40
def scale_kernel(acc_gmem, s_gmem, out_gmem, s_smem, a_smem, bar):
    plgpu.copy_gmem_to_smem(s_gmem, s_smem, bar)
    plgpu.copy_gmem_to_smem(acc_gmem, a_smem, bar)
    plgpu.barrier_wait(bar)
    acc = plgpu.load(a_smem, (), layout=plgpu.Layout.WGMMA)
    total = acc * 0
    for h in (0, 7, 39):
        rows = plgpu.load(s_smem.at[:, h * 8], (), layout=plgpu.Layout.WGMMA.reduce(0),
                          optimized=False)
        total = total + acc * lax.broadcast_in_dim(rows, acc.shape, [1])
    a_smem[...] = total
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(a_smem, out_gmem)
    plgpu.wait_smem_to_gmem(0)

def run_scale(acc, s):
    k = plgpu.kernel(scale_kernel, out_type=jax.ShapeDtypeStruct((64, BM), jnp.float32),
                     scratch_types=(plgpu.SMEM((BM, H * 8), jnp.float32),
                                    plgpu.SMEM((64, BM), jnp.float32),
                                    plgpu.Barrier(num_arrivals=2)),
                     compiler_params=plgpu.CompilerParams(
                         lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return k(acc, s)

x = jnp.asarray(np.random.default_rng(0).standard_normal((64, D)), jnp.float32)
acc = jnp.asarray(np.random.default_rng(1).standard_normal((64, BM)), jnp.float32)
s = jnp.asarray(np.random.default_rng(2).random((BM, H * 8)), jnp.float32)
which = sys.argv[1:] or ["export", "interpret"]
for name, f, args in (("quant", run_quant, (x,)), ("scale", run_scale, (acc, s))):
    if "export" in which:
        try:
            jax.export.export(jax.jit(f), platforms=["cuda"])(*args)
            print(name, "lowers for cuda")
        except Exception as e:
            print(name, "export FAILED:", type(e).__name__, str(e)[:600])
    if "interpret" in which:
        try:
            with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
                out = jax.jit(f)(*args)
            if name == "quant":
                q, sc = out
                ref_s = np.maximum(np.abs(np.asarray(x)).max(1) / 448, 1e-12)
                print("quant scales ok", np.allclose(np.asarray(sc)[:, :, 0].reshape(-1), ref_s[:T*G]),
                      "values ok", np.allclose(np.asarray(q, np.float32).reshape(-1, D) * ref_s[:T*G, None], np.asarray(x)[:T*G], rtol=0.07, atol=1e-3))
            else:
                want = sum(np.asarray(acc) * np.asarray(s)[:, h * 8][None, :] for h in (0, 7, 39))
                print("scale ok", np.allclose(np.asarray(out), want, rtol=1e-5))
        except Exception as e:
            print(name, "interpret FAILED:", type(e).__name__, str(e)[:600])
