"""Shared fixtures of the serving tests: the embedded model's tokenizer and a stand-in runner."""

import pytest

from jaxattn.serve import default_model
from jaxattn.serve.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer"))
    default_model.build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return Tokenizer(tokenizer_dir)
