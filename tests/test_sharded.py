"""Runs tests/sharded (tensor / expert / data parallel on 8 devices) in its own process, where
this one has fewer than 8 devices.

tests/conftest.py gives the test processes 8 simulated CPU devices, so on the CPU tests/sharded
runs in the session itself and this is skipped. The device count of a JAX process is fixed
when its backend starts, so with another default backend (one GPU) the 8 CPU devices
(``--xla_force_host_platform_device_count=8``) need a fresh interpreter.
"""

import os
import subprocess
import sys

import jax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_suite_on_8_simulated_devices():
    if jax.device_count() >= 8:
        pytest.skip("tests/sharded runs in this session (8 simulated CPU devices)")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--durations=5", os.path.join(HERE, "sharded")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2]
