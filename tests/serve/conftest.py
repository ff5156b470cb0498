"""Shared fixtures of the serving tests: the embedded tiny Llama 4 (random weights, f32,
reference attention), its tokenizer, runners of any size over it, and a 2-layer bf16
model for lowering the GPU step on the CPU."""

import jax.numpy as jnp
import pytest

from jaxattn.models import llama4
from jaxattn.serve import default_model
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.model_runner import Llama4Runner
from jaxattn.serve.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def model_dir():
    return default_model.default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="session")
def make_runner(model_dir):
    """make_runner(max_num_seqs=, max_num_batched_tokens=, max_model_len=, num_pages=): the
    step compiled for two buckets, 16 tokens and the whole budget."""
    model = llama4.load(model_dir)

    def make(*, max_num_seqs, max_num_batched_tokens, max_model_len, num_pages, page_size=16):
        config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, page_size=page_size,
                              buckets=(16, max_num_batched_tokens), attention_impl="reference")
        return Llama4Runner(model, config, num_pages=num_pages)

    return make


@pytest.fixture(scope="session")
def lowering_model():
    """(config, model): a 2-layer Llama 4 (one MoE, one dense layer; chunked and global
    attention), bf16, random weights: the GPU step's shapes at toy size."""
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=512, hidden_size=256, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=256))
    return config, llama4.init_random(config, seed=0, dtype=jnp.bfloat16)
