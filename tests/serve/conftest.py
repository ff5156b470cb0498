"""Shared fixtures of the serving tests.

``make_runner`` gives the engine's model: the embedded tiny Llama 4 (random weights, f32,
reference attention) through :class:`~jaxattn.serve.model_runner.Llama4Runner` when
``jaxattn.models.llama4`` is present, else the stand-in :class:`toy_model.ToyRunner` of the
same protocol. Both share the embedded model's tokenizer.
"""

import pytest

from jaxattn.models import llama4
from jaxattn.serve import default_model
from jaxattn.serve.tokenizer import Tokenizer

HAVE_LLAMA4 = hasattr(llama4, "load")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    if HAVE_LLAMA4:
        return default_model.default_model_dir()
    path = str(tmp_path_factory.mktemp("tokenizer"))
    default_model.build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def make_runner(tokenizer_dir, tokenizer):
    """make_runner(max_num_seqs=, max_num_batched_tokens=, max_model_len=, num_pages=)."""
    if HAVE_LLAMA4:
        from jaxattn.serve.model_runner import EngineShape, Llama4Runner

        model = llama4.load(tokenizer_dir)

        def make(*, max_num_seqs, max_num_batched_tokens, max_model_len, num_pages, page_size=16):
            shape = EngineShape(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                page_size=page_size)
            return Llama4Runner(model, shape, num_pages=num_pages, impl="reference")
    else:
        from toy_model import ToyRunner

        def make(**kw):
            return ToyRunner(vocab_size=tokenizer.vocab_size, **kw)
    return make
