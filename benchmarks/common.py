"""Helpers the benchmark scripts share: where results go, and starting a server."""

from __future__ import annotations

import json
import os
import subprocess
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(name: str, data) -> str:
    """Write ``data`` to benchmarks/results/NAME, and to $OUT/NAME when the device tool sets it."""
    os.makedirs(RESULTS, exist_ok=True)
    paths = [os.path.join(RESULTS, name)]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], name))
    for path in paths:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    return paths[0]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Block until ``url``/health answers 200; RuntimeError if the server exits or is too slow."""
    import httpx  # imported here: only the serving benchmarks need it

    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("the server did not start in time")
        time.sleep(0.5)
