import pathlib
import sys

import jax
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

# Shared helpers (attention_cases) live one level up; tests/ has no __init__.py.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


@pytest.fixture
def interpret():
    """GPU interpret mode on the CPU device, also on a GPU host. The interpreter runs the
    kernel's ops in XLA, as the references run theirs, and XLA on a GPU rounds some bf16
    intermediates otherwise than on the CPU: the q/k rows' exact-match checks, written
    for the CPU, found 74% of values equal on an H100 (session 49), every one within a
    bf16 step. The kernels on the GPU have tests of their own."""
    with jax.default_device(jax.devices("cpu")[0]), \
            plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        yield
