import pytest

from jaxattn.kernels import common


@pytest.fixture(autouse=True)
def _keep_dependent_launch(monkeypatch):
    """A benchmark's main turns programmatic dependent launch off for its process
    (benchmarks.common.time_kernels_alone): restore the setting after each test."""
    monkeypatch.setattr(common, "DEPENDENT_LAUNCH", common.DEPENDENT_LAUNCH)
