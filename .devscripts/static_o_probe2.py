import sys; sys.path.insert(0, "tests/models/llama4"); sys.path.insert(0, "tests")
import jax.numpy as jnp, numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxattn.models import llama4
from jaxattn.kernels import common
from step_cases import serve_steps, toy_moe_case
config, model, bounds, steps = toy_moe_case(seed=4)
steps = steps[:4]
bf16 = llama4.init_random(config, seed=4, dtype=jnp.bfloat16)
ref = serve_steps(bf16, bounds, steps, jnp.bfloat16, impl="reference")[0]
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
out = {}
for static in (False, True):
    llama4.model.STATIC_O_SCALE = static
    out[static, "xla"] = serve_steps(model, bounds, steps, jnp.bfloat16, impl="reference")[0]
    common.on_hopper = lambda: True
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        out[static, "k"] = serve_steps(model, bounds, steps, jnp.bfloat16, impl="interpret", decode_only_tokens=(16,))[0]
    common.on_hopper = lambda: False
for k, v in out.items():
    rows = [rel(v[i], ref[i]) for i in range(len(v))]
    print(k, "vs bf16 %.3f" % rel(v, ref), "rows", " ".join("%.2f" % r for r in rows), flush=True)
print("k-static vs xla-static %.3f; k-dyn vs xla-dyn %.3f" % (rel(out[True, "k"], out[True, "xla"]), rel(out[False, "k"], out[False, "xla"])))
