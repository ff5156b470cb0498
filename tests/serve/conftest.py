"""Shared fixtures of the serving tests: the embedded tiny Llama 4 (random weights, f32,
reference attention), its tokenizer, and runners of any size over it."""

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
