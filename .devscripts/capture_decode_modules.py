"""Every Mosaic module (printed without locations) and the StableHLO around them (minus the
serialized modules) that decode_attention lowers to for CUDA, over a few configs: to check
that a refactor changed nothing the GPU runs. Usage: capture_decode_modules.py OUT.json"""
import hashlib, json, re, sys
import jax, jax.numpy as jnp
from jax.experimental.mosaic.gpu import core
import jaxattn
from jaxattn import planner
from jaxattn.kernels import decode

modules = []
lower = core.lower_mgpu_module
core.lower_mgpu_module = lambda module, *a, **k: (lower(module, *a, **k), modules.append(str(module)))[0]

def export(bounds, dtype, config=None, kv_dtype=None):
    cap = planner.capacity(bounds).decode_items
    i32, sds = jnp.int32, jax.ShapeDtypeStruct
    items = planner.WorkList(*[sds((cap,), i32)] * 8, sds((), i32))
    t = bounds.max_num_batched_tokens
    kvd = kv_dtype or dtype
    pool = sds((64, bounds.page_size, bounds.num_kv_heads, bounds.head_dim), kvd)
    extra = {}
    args = [sds((t, bounds.num_q_heads, bounds.head_dim), dtype), pool, pool,
            sds((bounds.max_num_seqs, bounds.pages_per_seq), i32), items]
    if kv_dtype is not None:
        sc = sds((64, bounds.num_kv_heads, bounds.page_size), jnp.float32)
        args += [sc, sc]
        fn = lambda q, k, v, pt, items, ks, vs: decode.decode_attention(
            q, k, v, pt, items, bounds=bounds, scale=0.1, config=config, k_scale=ks, v_scale=vs)
    else:
        fn = lambda q, k, v, pt, items: decode.decode_attention(
            q, k, v, pt, items, bounds=bounds, scale=0.1, config=config)
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    text = re.sub(r'backend_config = \{[^}]*\}', 'BC', exp.mlir_module())
    text = re.sub(r'loc\([^)]*\)', '', text)
    return hashlib.sha256(text.encode()).hexdigest()

out = {}
b = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=8256, page_size=16,
                   num_q_heads=40, num_kv_heads=8, head_dim=128, chunk_size=8192)
b32 = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=8256, page_size=32,
                     num_q_heads=40, num_kv_heads=8, head_dim=128, chunk_size=8192)
cases = {
    "bf16_default": (b, jnp.bfloat16, None, None),
    "bf16_cfg_consumers2": (b, jnp.bfloat16, decode.DecodeConfig(p_in_registers=True, consumers=2), None),
    "bf16_combine4": (b, jnp.bfloat16, decode.DecodeConfig(p_in_registers=True, combine=decode.CombineConfig(cols=16, warpgroups=4)), None),
    "fp8_default": (b32, jnp.bfloat16, None, jnp.float8_e4m3fn),
}
for name, (bounds, dtype, cfg, kvd) in cases.items():
    modules.clear()
    h = export(bounds, dtype, cfg, kvd)
    out[name] = dict(stablehlo=h, modules=[hashlib.sha256(m.encode()).hexdigest() for m in modules],
                     n=len(modules))
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1)[:2000])
