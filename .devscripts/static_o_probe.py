import sys; sys.path.insert(0, "tests/models/llama4"); sys.path.insert(0, "tests")
import jax.numpy as jnp, numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxattn.models import llama4
from jaxattn.kernels import common
from step_cases import serve_steps, toy_moe_case

config, model, bounds, steps = toy_moe_case(seed=4)
steps = steps[:3]
bf16 = llama4.init_random(config, seed=4, dtype=jnp.bfloat16)
ref = serve_steps(bf16, bounds, steps, jnp.bfloat16, impl="reference")[0]
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
out = {}
for static in (False, True):
    llama4.model.STATIC_O_SCALE = static
    for impl in ("reference",):
        out[static, impl] = serve_steps(model, bounds, steps, jnp.bfloat16, impl=impl)[0]
        print(static, impl, "vs bf16", rel(out[static, impl], ref), flush=True)
print("static vs dynamic", rel(out[True, "reference"], out[False, "reference"]))
print([l.self_attn.o_scale for l in model.model.layers], [l.self_attn.fixed_v_scale for l in model.model.layers])
