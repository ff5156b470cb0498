"""FP8 prefill: the register split between consumers and the dequantising producer, timed
beside bf16 (interleaved, best of 3). argv: cases mode:length."""
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import prefill
from benchmarks.fp8_kv import _cache, _flops, HQ, HKV, D, PAGE, CHUNK
from benchmarks.common import gpu_ms

VARIANTS = {"bf16": (False, {}), "fp8_224": (True, {}),
            "fp8_216": (True, dict(consumer_registers=216)),
            "fp8_208": (True, dict(consumer_registers=208)),
            "fp8_216_v4": (True, dict(consumer_registers=216, dequant_vector=4)),
            "fp8_216_v2": (True, dict(consumer_registers=216, dequant_vector=2))}

def case(mode, length):
    chunk = CHUNK if mode == "chunked" else None
    (k, v), (k8, v8, ks, vs), table = _cache(1, length, seed=1)
    q = jax.random.normal(jax.random.key(8), (length, HQ, D), jnp.bfloat16)
    cu, kv = np.array([0, length], np.int32), np.array([length], np.int32)
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=length, max_model_len=length,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=chunk, block_kv=128)
    plan = jax.jit(lambda: planner.plan(bounds, cu, kv, np.int32(1), chunk_size=chunk))()
    fns, outs = {}, {}
    for name, (fp8, extra) in VARIANTS.items():
        sc = dict(k_scale=ks, v_scale=vs) if fp8 else {}
        cfg = dataclasses.replace(prefill.pick_config(bounds, q.dtype, k8.dtype if fp8 else None),
                                  **extra)
        print(name, cfg, file=sys.stderr, flush=True)
        f = jax.jit(lambda q, k, v, pt, plan, sc=sc, c=cfg: kernels.ragged_paged_attention(
            q, k, v, pt, plan, bounds=bounds, scale=D ** -0.5, config=c, **sc)[0])
        fns[name] = (f, (q, *((k8, v8) if fp8 else (k, v)), table, plan))
        outs[name] = f(*fns[name][1])
    same = all(bool((outs[n] == outs["fp8_224"]).all()) for n in VARIANTS if n.startswith("fp8"))
    best = {n: float("inf") for n in fns}
    for _ in range(3):
        for n, (f, a) in fns.items():
            best[n] = min(best[n], gpu_ms(f, *a))
    fl = _flops(mode, length)
    print(f"| {mode} {length} | " + " | ".join(
        f"{best[n]:.3f} ({fl/best[n]/1e9:.0f}, {best[n]/best['bf16']:.3f})" for n in fns)
        + f" | {same} |", flush=True)

print("| case | " + " | ".join(VARIANTS) + " | fp8 forms equal |")
print("|---" * (len(VARIANTS) + 2) + "|")
for arg in sys.argv[1:]:
    mode, length = arg.split(":")
    case(mode, int(length))
