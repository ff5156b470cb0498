"""Tests that need 8 devices: they run in their own process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), started by
``tests/test_sharded.py``; in any other process (one device) they are skipped.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest tests/sharded
"""

import jax
import pytest

NUM_DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= NUM_DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {NUM_DEVICES} devices: runs in its own process "
                            "(tests/test_sharded.py)")
    for item in items:
        if "tests/sharded/" in item.nodeid or item.nodeid.startswith("sharded/"):
            item.add_marker(skip)
