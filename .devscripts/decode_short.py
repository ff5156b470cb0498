"""Session 40: the decode kernel's time at batch 1 over few keys (the chunked-local layers'
case: 8.2-8.4 us a call in the full step), per config, kernel time from a CUPTI trace."""
import dataclasses, json, os, sys
import jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import planner
from jaxattn.kernels import decode, decode_schedule
from benchmarks.common import trace_summary

HQ, HKV, D, PAGE = 40, 8, 128, 16
out = {}
for kv_len in (1, 100, 1000, 8192):
    bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=8256,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=8192)
    pages = -(-kv_len // PAGE)
    keys = jax.random.split(jax.random.key(0), 3)
    t = 16
    q = jax.random.normal(keys[0], (t, HQ, D), jnp.bfloat16)
    kp = jax.random.normal(keys[1], (600, PAGE, HKV, D), jnp.bfloat16)
    vp = jax.random.normal(keys[2], (600, PAGE, HKV, D), jnp.bfloat16)
    table = np.zeros((8, bounds.pages_per_seq), np.int32)
    table[0, :pages] = np.arange(pages)
    cu = np.array([0, 1] + [1] * 7, np.int32)
    kvl = np.array([kv_len] + [0] * 7, np.int32)
    plan = planner.plan(bounds, jnp.asarray(cu), jnp.asarray(kvl), jnp.int32(1), chunk_size=8192)
    md = decode_schedule.decode_metadata(plan.decode, bounds=bounds, num_tokens=t)
    base = decode.pick_config(bounds, jnp.bfloat16)
    configs = {"default": base, "narrow": dataclasses.replace(base, narrow_tiles=True),
               "2consumers": dataclasses.replace(base, consumers=2),
               "bk64": dataclasses.replace(base, block_kv=64, num_stages=4)}
    for name, cfg in configs.items():
        try:
            f = jax.jit(lambda q, k, v, pt, items, md, cfg=cfg: decode.decode_attention(
                q, k, v, pt, items, bounds=bounds, scale=0.088, config=cfg, metadata=md))
            args = (q, kp, vp, jnp.asarray(table), plan.decode, md)
            jax.block_until_ready(f(*args))
            tr = trace_summary(lambda: jax.block_until_ready(f(*args)), reps=20, top=6)
            ks = {k["name"][:40]: round(k["ms"] * 1e3 / k["calls"], 2) for k in tr["kernels"]
}
            out[f"{kv_len}-{name}"] = ks
            print(kv_len, name, ks, flush=True)
        except Exception as e:
            print(kv_len, name, "FAILED", type(e).__name__, str(e)[:200], flush=True)
os.makedirs(os.environ.get("OUT", "/tmp") + "/results", exist_ok=True)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/results/decode-short-2026-12-05-s40.json", "w"), indent=1)
