"""What a Llama 4 step must cost at least: the bytes a decode step reads, the FLOPs a prompt
needs, and the device ceilings they are divided by (shared by benchmarks/model.py and
benchmarks/multigpu.py)."""

from __future__ import annotations

import statistics
import time

# bf16 dense tensor-core peak of an H100/H200 SXM (dense, no sparsity), for MFU.
BF16_PEAK_TFLOPS = 989.4


def decode_bytes(cfg, batch: int, kv_len: int, *, fp8: bool = False,
                 fp8_attention: bool = False) -> dict:
    """Bytes one decode step must read (bf16 weights; ``fp8``: the experts and MLPs at one byte;
    ``fp8_attention``: the attention projections too; scales not counted): the weights it uses
    and the KV it attends to."""
    h, d, e, inter = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.intermediate_size
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    # Experts the batch can hit: expected distinct experts under uniform top-k routing
    # (exactly 1 for batch 1 top-1).
    hit = e * (1 - (1 - 1 / e) ** (batch * cfg.num_experts_per_tok))
    ff_bytes = 1 if fp8 else 2
    weights, kv = 0.0, 0.0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe(i):
            ff = 3 * h * inter * (1 + hit) * ff_bytes + 2 * h * e
        else:
            ff = 3 * h * cfg.intermediate_size_mlp * ff_bytes
        weights += (1 if fp8_attention else 2) * attn + ff + 2 * 2 * h
        chunk = cfg.layer_chunk_size(i)
        visible = kv_len if chunk is None else kv_len - ((kv_len - 1) // chunk) * chunk
        kv += batch * visible * cfg.num_key_value_heads * d * 2
    weights += 2 * (cfg.vocab_size * h + h + batch * h)  # LM head, final norm, embedding rows
    return dict(weight_bytes=weights, kv_bytes=2 * kv, experts_hit=hit)


def prefill_flops(cfg, prompt: int) -> float:
    """Useful FLOPs of one prompt's prefill: 2 x the active linear parameters per token, plus
    attention (causal on global layers, within the 8192-token chunk on chunked-local ones);
    the LM head for the last token only."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn_params = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    flops = 0.0
    for i in range(cfg.num_hidden_layers):
        ff = (3 * h * inter * (1 + cfg.num_experts_per_tok) + h * cfg.num_local_experts
              if cfg.is_moe(i) else 3 * h * cfg.intermediate_size_mlp)
        flops += 2 * prompt * (attn_params + ff)
        chunk = cfg.layer_chunk_size(i)
        if chunk is None:
            pairs = prompt * (prompt + 1) / 2
        else:
            full, rest = divmod(prompt, chunk)
            pairs = full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2
        flops += 4 * pairs * cfg.num_attention_heads * d  # QK^T and PV
    return flops + 2 * h * cfg.vocab_size


def read_bandwidth(nbytes: int = 2 << 30, n: int = 10, reps: int = 5) -> float:
    """Same-run read-only HBM bandwidth of the default device (bytes/s): the median over
    ``reps`` batches of ``n`` back-to-back sums over ``nbytes`` of bf16 (decode only reads)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    f(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            y = f(x)
        y.block_until_ready()
        times.append((time.perf_counter() - t) / n)
    return x.nbytes / statistics.median(times)
