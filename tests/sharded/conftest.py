"""Tests that need 8 devices. tests/conftest.py gives every test process 8 simulated CPU
devices (``jax_num_cpu_devices``), so they run with the rest of the suite; where the
process has fewer (a GPU as the default backend), they are skipped here and
``tests/test_sharded.py`` runs them on 8 CPU devices in a process of their own.

    .venv/bin/python -m pytest tests/sharded
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
