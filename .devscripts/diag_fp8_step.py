"""Toy FP8-cache serving steps with the q/k rows kernel's writes (on) or XLA's (off), timed
step by step: where does the GPU run hang?"""
import sys, time
import numpy as np
import jax, jax.numpy as jnp
from jaxattn.models import llama4
from jaxattn.kernels import qk_rows
from jaxattn.models.llama4.quantization import Fp8Scheme
from jaxattn.serve import kv_cache as cache, paged_step
from jaxattn.serve.batch import build_step, SeqStep
from jaxattn.serve.config import EngineConfig

mode = sys.argv[1]
from jaxattn.kernels import grouped_matmul
grouped_matmul.DENSE_MIN_N_TILES = 1
t0 = time.time()
log = lambda *a: print(f"[{time.time() - t0:7.1f}s]", *a, flush=True)
if mode == "xla":
    qk_rows._use_kernel = lambda *a: False
config = llama4.Llama4Config.from_hf_dict(dict(
    vocab_size=1024, hidden_size=512, intermediate_size=256, intermediate_size_mlp=512,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
    num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=256,
    initializer_range=0.05))
model = llama4.init_random(config, seed=5, dtype=jnp.bfloat16, fp8=Fp8Scheme(attention=True))
kvd = sys.argv[2] if len(sys.argv) > 2 else "fp8"
bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024,
                      page_size=64, kv_cache_dtype=kvd).bounds(config)
ids = np.random.default_rng(5).integers(0, config.vocab_size, 620).tolist()
pages = [range(4 * i, 4 * i + 4) for i in range(4)]
lens = (200, 129, 64, 90)
starts = np.cumsum((0,) + lens)
steps = [(512, [SeqStep(ids[a:a + n], 0, p) for a, n, p in zip(starts, lens, pages)])]
steps += [(16, [SeqStep(ids[500 + 4 * d + i:501 + 4 * d + i], n + d, p)
                for i, (n, p) in enumerate(zip(lens, pages))]) for d in range(4)]
step = paged_step.make_step_fn(model, bounds)
kv = cache.allocate(paged_step.cache_spec(config, num_pages=16, page_size=64, dtype=kvd))
log("built", mode, kvd)
for i, (tokens, seqs) in enumerate(steps):
    log("step", i, "bucket", tokens, "lowering/compiling+run")
    logits, kv = step(kv, build_step(bounds, tokens, seqs, num_pages=16))
    jax.block_until_ready((logits, kv))
    log("step", i, "done", float(jnp.abs(logits[:len(seqs)].astype(jnp.float32)).mean()))
log("all done")
