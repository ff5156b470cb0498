"""Shared pieces of the 8-device tests: tiny configs whose heads, experts, columns and
vocabulary divide every mesh tested, and meshes by (tensor, expert) size."""

import functools

import numpy as np

from jaxattn import parallel
from jaxattn.models import llama4

# Scout's structure at toy size: 3 chunked-local RoPE layers then a global NoPE layer, MoE on
# layers 1 and 3, 16/8 heads (one KV head per device at 8), 8 experts, chunk 32 (a 100-token
# sequence crosses three chunk boundaries). f32, so sharded and single-device logits agree to
# summation order.
BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=16,
    num_local_experts=8, num_experts_per_tok=1, moe_layers=[1, 3], no_rope_layers=[1, 1, 1, 0],
    attention_chunk_size=32, initializer_range=0.1, floor_scale=32, bos_token_id=0,
    eos_token_id=[1, 4], pad_token_id=5, max_position_embeddings=4096)
# The other code paths: top-2 routing, tied embeddings, attention biases (added once, after
# the all-reduce) and a vocabulary that 4 devices cannot split (replicated embedding/head).
VARIANT = dict(BASE, vocab_size=510, num_experts_per_tok=2, tie_word_embeddings=True,
               attention_bias=True)

MESHES = [(2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 2)]  # (tensor, expert)


def config(variant: bool = False) -> llama4.Llama4Config:
    return llama4.Llama4Config.from_hf_dict(VARIANT if variant else BASE)


@functools.lru_cache(maxsize=None)
def mesh(tensor: int, expert: int):
    pc = parallel.ParallelConfig(tensor=tensor, expert=expert)
    return parallel.replica_meshes(parallel.make_mesh(pc))[0]


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
