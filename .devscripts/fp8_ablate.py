"""Timing-only ablations of the FP8 prefill (wrong numbers by design): which part of the
FP8 form costs its 17% at causal 4k-16k? Each variant's patch is active whenever it is
traced or called."""
import contextlib, dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.mosaic.gpu import profiler
import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import common, prefill
from jax.experimental.pallas import mosaic_gpu as plgpu
from benchmarks.fp8_kv import _cache, _flops, HQ, HKV, D, PAGE, CHUNK
from benchmarks.common import gpu_ms

orig_q = common.quantize_rows

def no_kscale():
    common.column_scales = lambda scale, shape: 1.0
def no_qscale():
    common.quantize_rows = lambda src, dst, vector=2: (orig_q(src, dst, vector), 1.0)[1]
def no_vdeq():
    common.dequantize_tile = lambda src8, scale, dst, vector=2: (plgpu.commit_smem(), dst)[1]

PATCHES = {"bf16": [], "fp8": [], "fp8_noK": [no_kscale], "fp8_noQ": [no_qscale],
           "fp8_noKQ": [no_kscale, no_qscale], "fp8_noVdeq": [no_vdeq],
           "fp8_none": [no_kscale, no_qscale, no_vdeq]}
SAVED = {n: getattr(common, n) for n in ("column_scales", "quantize_rows", "dequantize_tile")}

@contextlib.contextmanager
def patched(name):
    for p in PATCHES[name]:
        p()
    try:
        yield
    finally:
        for n, f in SAVED.items():
            setattr(common, n, f)

def case(mode, length, extra):
    chunk = CHUNK if mode == "chunked" else None
    (k, v), (k8, v8, ks, vs), table = _cache(1, length, seed=1)
    q = jax.random.normal(jax.random.key(8), (length, HQ, D), jnp.bfloat16)
    cu, kv = np.array([0, length], np.int32), np.array([length], np.int32)
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=length, max_model_len=length,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=chunk, block_kv=128)
    plan = jax.jit(lambda: planner.plan(bounds, cu, kv, np.int32(1), chunk_size=chunk))()
    fns = {}
    for name in PATCHES:
        fp8 = name != "bf16"
        sc = dict(k_scale=ks, v_scale=vs) if fp8 else {}
        cfg = prefill.pick_config(bounds, q.dtype, k8.dtype if fp8 else None)
        for key, val in extra.items():
            cfg = dataclasses.replace(cfg, **{key: val})
        f = jax.jit(lambda q, k, v, pt, plan, sc=sc, c=cfg: kernels.ragged_paged_attention(
            q, k, v, pt, plan, bounds=bounds, scale=D ** -0.5, config=c, **sc)[0])
        fns[name] = (f, (q, *((k8, v8) if fp8 else (k, v)), table, plan))
    best = {n: float("inf") for n in fns}
    for _ in range(3):
        for n, (f, a) in fns.items():
            with patched(n):
                best[n] = min(best[n], gpu_ms(f, *a))
    fl = _flops(mode, length)
    tag = f"{mode} {length} {extra or ''}"
    print(f"| {tag} | " + " | ".join(f"{best[n]:.3f} ({fl/best[n]/1e9:.0f}, {best[n]/best['bf16']:.3f})"
                                      for n in fns) + " |", flush=True)

print("| case | " + " | ".join(PATCHES) + " |")
print("|---" * (len(PATCHES) + 1) + "|")
for arg in sys.argv[1:]:
    mode, length, *kv = arg.split(":")
    extra = dict(x.split("=") for x in kv)
    extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
    case(mode, int(length), extra)
