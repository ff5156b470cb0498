"""The serving process's GPU allocator, and device memory where the allocator reports none.

A decode step runs as CUDA graphs (XLA command buffers), and XLA re-records a graph whenever
an allocation it uses has moved since it was recorded. The step keeps its own addresses
still (``paged_step.make_step_fn(reuse_outputs=True)``: inputs staged into kept buffers,
outputs written into the previous step's donated buffers, the KV pools donated), and XLA's
default allocator, BFC with the device's share preallocated, hands the temp buffer back at
the same address: so the graphs are recorded once and replayed.

XLA's VMM allocator (``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``) can pin addresses by itself
(``xla_gpu_command_buffer_update_mode=SKIP_PROFILED``, which also lets the all-reduces
into the graphs), but it maps and unmaps each pinned allocation around every execution,
and full-size Scout has ~1,000 weight arrays. Batch-1 decode of FP8 Scout on one H200
(benchmarks/NOTES-model.md): 11.5 ms per step under BFC, 41.3 ms under VMM, 44.0 ms under
VMM with 16 GB of the GPU left free (so not memory pressure); bf16 Scout at TP=2 on 2xH200
took 31.5 ms under VMM. The engine therefore leaves XLA's default allocator alone and only
says so when a user picks VMM (:func:`vmm_active`; the step's options then pin addresses
the VMM way).

The VMM allocator reports no memory statistics, which the memory planner needs;
:func:`device_memory` then asks the CUDA driver.
"""

from __future__ import annotations

import ctypes
import functools
import os

ENV = "XLA_PYTHON_CLIENT_ALLOCATOR"
# XLA's default share of device memory for its allocator (XLA_CLIENT_MEM_FRACTION overrides).
DEFAULT_MEM_FRACTION = 0.75


def vmm_active() -> bool:
    """Whether this process's GPU allocator is (or will start as) VMM."""
    return os.environ.get(ENV, "").lower() == "vmm"


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
