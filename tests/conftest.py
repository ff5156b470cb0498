import pytest
from hypothesis import settings

from jaxattn.kernels import on_hopper

settings.register_profile("ci", deadline=None, max_examples=150, print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a Hopper GPU is (`make gpu`); elsewhere they are skipped."""
    if on_hopper():
        return
    skip = pytest.mark.skip(reason="needs a Hopper GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
