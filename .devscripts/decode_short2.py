"""Session 41: the decode kernel at batch 1 over few keys, HEAD~ (decode_base) against the
working tree (skipped copies past kv_end, q copies per token of the item, zero rows from the
last CTAs, read-only final waits), interleaved per case, kernel times from CUPTI traces."""
import dataclasses, json, os, sys
import jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import planner
from jaxattn.kernels import decode, decode_schedule
sys.path.insert(0, ".devscripts")
import decode_base
from benchmarks.common import trace_summary

HQ, HKV, D, PAGE = 40, 8, 128, 16
out = {}
for kv_len in (1, 40, 100, 1000, 8192):
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
    args = (q, kp, vp, jnp.asarray(table), plan.decode, md)
    base = decode.pick_config(bounds, jnp.bfloat16)
    configs = {"default": base, "narrow": dataclasses.replace(base, narrow_tiles=True),
               "bk64": dataclasses.replace(base, block_kv=64, num_stages=4)}
    fns = {}
    for name, cfg in configs.items():
        for tag, mod in (("base", decode_base), ("new", decode)):
            fns[name, tag] = jax.jit(lambda q, k, v, pt, items, md, cfg=cfg, mod=mod:
                                     mod.decode_attention(q, k, v, pt, items, bounds=bounds,
                                                          scale=0.088, config=cfg,
                                                          metadata=md)[0])
    for rnd in range(2):
        for (name, tag), f in fns.items():
            try:
                o = jax.block_until_ready(f(*args))
                if tag == "base":
                    ref = o
                elif not bool(jnp.all(o == ref)):
                    print(kv_len, name, "OUTPUTS DIFFER", float(jnp.abs(o.astype(float) - ref.astype(float)).max()))
                tr = trace_summary(lambda: jax.block_until_ready(f(*args)), reps=30, top=6)
                ks = {k["name"][:24]: round(k["ms"] * 1e3 / k["calls"], 2) for k in tr["kernels"]}
                out.setdefault(f"{kv_len}-{name}-{tag}", []).append(ks)
                print(kv_len, name, tag, rnd, ks, flush=True)
            except Exception as e:
                print(kv_len, name, tag, "FAILED", type(e).__name__, str(e)[:300], flush=True)
os.makedirs(os.environ.get("OUT", "/tmp") + "/results", exist_ok=True)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/results/decode-short-2026-12-05-s41.json", "w"), indent=1)
