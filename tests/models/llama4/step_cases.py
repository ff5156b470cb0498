"""A toy Llama 4 through the serving step: a prefill then decode steps from an empty paged
cache (the model tests that compare the step's kernel paths share these)."""

import jax.numpy as jnp
import numpy as np

from jaxattn.models import llama4


def prefill_then_decode_steps(ids) -> list:
    """(bucket, [SeqStep]) of a 512-token step prefilling four sequences of 200, 129, 64 and
    90 tokens of ``ids`` (4 pages of 64 each), then four decode steps in a 16-row bucket:
    decode across a page start (64) and just past one (129)."""
    from jaxattn.serve.batch import SeqStep

    pages = [range(4 * i, 4 * i + 4) for i in range(4)]
    lens = (200, 129, 64, 90)
    starts = np.cumsum((0,) + lens)
    steps = [(512, [SeqStep(ids[a:a + n], 0, p) for a, n, p in zip(starts, lens, pages)])]
    return steps + [(16, [SeqStep(ids[500 + 4 * d + i:501 + 4 * d + i], n + d, p)
                          for i, (n, p) in enumerate(zip(lens, pages))]) for d in range(4)]


def serve_steps(model, bounds, steps, kv_dtype, impl="auto", decode_only_tokens=()) -> tuple:
    """``steps`` (:func:`prefill_then_decode_steps`) through the serving step from an empty
    cache of 16 pages -> (the sequences' logits, stacked, f32; the cache after them).
    ``impl``, ``decode_only_tokens``: the attention's, and the decode-only buckets
    (``make_step_fn``'s)."""
    from jaxattn.serve import kv_cache as cache
    from jaxattn.serve import paged_step
    from jaxattn.serve.batch import build_step

    step = paged_step.make_step_fn(model, bounds, impl=impl,
                                   decode_only_tokens=decode_only_tokens)
    kv = cache.allocate(paged_step.cache_spec(model.config, num_pages=16, page_size=64,
                                              dtype=kv_dtype))
    out = []
    for tokens, seqs in steps:
        logits, kv = step(kv, build_step(bounds, tokens, seqs, num_pages=16))
        out.append(np.asarray(logits[:len(seqs)], np.float32))
    return np.concatenate(out), kv


def toy_moe_case(seed: int = 4):
    """(config, FP8 model with FP8 attention projections, bounds, :func:`prefill_then_decode_steps`)
    of a 2-layer top-1 MoE Llama 4 (4 experts, 8/2 heads of 128, chunk 256), bf16."""
    from jaxattn.models.llama4.quantization import Fp8Scheme
    from jaxattn.serve.config import EngineConfig

    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=1024, hidden_size=512, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=256,
        initializer_range=0.05))
    model = llama4.init_random(config, seed=seed, dtype=jnp.bfloat16,
                               fp8=Fp8Scheme(attention=True))
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024,
                          page_size=64).bounds(config)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, 620).tolist()
    return config, model, bounds, prefill_then_decode_steps(ids)
