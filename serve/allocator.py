"""The serving process's GPU allocator, and device memory where the allocator reports none.

A decode step runs as CUDA graphs (XLA command buffers). XLA re-records a graph whenever an
allocation it uses has moved since it was recorded, and with its default BFC allocator only
constants count as fixed: on full-size Scout (TP=2) every one of ~100 graphs per device was
re-recorded on every step, and the step cost more host time than GPU time. The VMM
allocator lets XLA treat allocations as fixed (the temp buffer at one reserved address
range; with ``xla_gpu_command_buffer_update_mode=SKIP_PROFILED`` also the weights and donated
buffers that held still while profiled), set per step in
:func:`jaxattn.serve.paged_step.step_compiler_options`. Measured on 2×H200 (TP=2, batch-1
decode at 8k; benchmarks/NOTES-model.md): full-size Scout 27.5 -> 13.0 ms per step.

The allocator is chosen by an environment variable that XLA reads once, when the GPU
backend starts, so the serving entry points call :func:`prefer_vmm` before anything touches
a device. A user's own ``XLA_PYTHON_CLIENT_ALLOCATOR`` wins.

The VMM allocator reports no memory statistics, which the memory planner needs;
:func:`device_memory` then asks the CUDA driver.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

ENV = "XLA_PYTHON_CLIENT_ALLOCATOR"
# XLA's default share of device memory for its allocator (XLA_CLIENT_MEM_FRACTION overrides).
DEFAULT_MEM_FRACTION = 0.75


def prefer_vmm() -> bool:
    """Ask for the VMM allocator unless the user chose one or a backend already started.

    Returns whether the VMM allocator will be (or already is) in use.
    """
    if ENV not in os.environ and not _backend_started():
        os.environ[ENV] = "vmm"
    return vmm_active()


def vmm_active() -> bool:
    """Whether this process's GPU allocator is (or will start as) VMM."""
    return os.environ.get(ENV, "").lower() == "vmm"


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def mem_fraction() -> float:
    value = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION")
    return float(value) if value else DEFAULT_MEM_FRACTION


def device_memory(device) -> tuple[int, int] | None:
    """(bytes XLA may still allocate, bytes it may allocate in all) on ``device``.

    From the allocator's statistics where it keeps them (BFC); else, on a CUDA device, from
    the driver: the allocator's share (:func:`mem_fraction`) of the device's total, less
    what is in use on it already (by anyone). None where neither is known (e.g. the CPU).
    """
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        limit = int(stats["bytes_limit"])
        return limit - int(stats.get("bytes_in_use", 0)), limit
    if getattr(device, "platform", None) != "gpu":
        return None
    info = _cuda_mem_info(getattr(device, "local_hardware_id", device.id))
    if info is None:
        return None
    free, total = info
    limit = int(total * mem_fraction())
    return max(0, limit - (total - free)), limit


@functools.cache
def _libcuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return lib if lib.cuInit(0) == 0 else None


def _cuda_mem_info(ordinal: int) -> tuple[int, int] | None:
    """(free, total) bytes of CUDA device ``ordinal``, through its primary context (XLA's)."""
    lib = _libcuda()
    if lib is None:
        return None
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cuDeviceGet(ctypes.byref(dev), ordinal) or lib.cuDevicePrimaryCtxRetain(
            ctypes.byref(ctx), dev):
        return None
    try:
        if lib.cuCtxPushCurrent_v2(ctx):
            return None
        try:
            if lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)):
                return None
            return free.value, total.value
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(dev)
