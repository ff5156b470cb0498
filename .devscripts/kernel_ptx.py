"""Compile the FP8 prefill (and decode) kernels in a given form once, so that
MOSAIC_GPU_DUMP_PTX=1 prints their PTX: `python kernel_ptx.py prefill|decode [field=value ...]`
(fields of PrefillConfig / DecodeConfig, e.g. dequant_vector=8)."""
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import decode, prefill
from benchmarks import fp8_kv

which, fields = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
fields = {k: (v == "True" if v in ("True", "False") else int(v)) for k, v in fields.items()}
(k, v), (k8, v8, ks, vs), table = fp8_kv._cache(4, 4096)
if which == "decode":
    bounds = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=8192,
                            page_size=32, num_q_heads=40, num_kv_heads=8, head_dim=128,
                            chunk_size=8192)
    table = jnp.pad(table, ((0, 0), (0, bounds.pages_per_seq - table.shape[1])))
    plan = planner.plan(bounds, np.minimum(np.arange(5), 4).astype(np.int32),
                        np.full(4, 4096, np.int32), np.int32(4))
    q = jax.random.normal(jax.random.key(1), (16, 40, 128), jnp.bfloat16)
    cfg = dataclasses.replace(decode.default_config(fp8=True), **fields)
    out = decode.decode_attention(q, k8, v8, table, plan.decode, bounds=bounds, scale=0.088,
                                  k_scale=ks, v_scale=vs, config=cfg)[0]
else:
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=4096, max_model_len=4096,
                            page_size=32, num_q_heads=40, num_kv_heads=8, head_dim=128)
    plan = planner.plan(bounds, np.array([0, 4096], np.int32), np.array([4096], np.int32),
                        np.int32(1))
    q = jax.random.normal(jax.random.key(1), (4096, 40, 128), jnp.bfloat16)
    cfg = dataclasses.replace(prefill.pick_config(bounds, q.dtype, k8.dtype), **fields)
    out = kernels.ragged_paged_attention(q, k8, v8, table[:1], plan, bounds=bounds,
                                         scale=0.088, config=cfg, k_scale=ks, v_scale=vs)[0]
print(which, fields, float(jnp.abs(out.astype(jnp.float32)).mean()))
