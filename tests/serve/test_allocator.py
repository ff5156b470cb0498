"""The serving process's allocator choice and its device-memory fallback (serve/allocator.py)."""

import types

import jax
import pytest

from jaxattn.serve import allocator, paged_step


@pytest.mark.parametrize("value,vmm", [(None, False), ("bfc", False), ("platform", False),
                                       ("vmm", True), ("VMM", True)])
def test_vmm_only_when_the_user_asks_for_it(monkeypatch, value, vmm):
    """The engine keeps XLA's default allocator; the VMM way of pinning addresses (and its
    step options) only when the user's environment names it."""
    if value is None:
        monkeypatch.delenv(allocator.ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV, value)
    assert allocator.vmm_active() is vmm


def _device(platform="gpu", stats=None):
    return types.SimpleNamespace(platform=platform, id=0, local_hardware_id=0,
                                 memory_stats=lambda: stats)


def test_device_memory_from_allocator_statistics():
    dev = _device(stats={"bytes_limit": 100, "bytes_in_use": 30})
    assert allocator.device_memory(dev) == (70, 100)


def test_device_memory_from_the_driver_without_statistics(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(allocator, "_cuda_mem_info", lambda ordinal: (100 * gib, 140 * gib))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    free, limit = allocator.device_memory(_device())
    assert limit == int(140 * gib * 0.9)
    assert free == limit - 40 * gib  # the 40 GiB in use (by anyone) come off the share
    monkeypatch.setattr(allocator, "_cuda_mem_info", lambda ordinal: (1 * gib, 140 * gib))
    assert allocator.device_memory(_device())[0] == 0  # never negative


def test_device_memory_unknown_on_the_cpu():
    assert allocator.device_memory(jax.devices("cpu")[0]) is None
    assert allocator.device_memory(_device(platform="cpu")) is None


@pytest.mark.parametrize("vmm", [False, True])
def test_step_options_fix_addresses_and_take_collectives_in_only_under_vmm(monkeypatch, vmm):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(allocator, "vmm_active", lambda: vmm)
    monkeypatch.delenv("JAXATTN_COMMAND_BUFFER", raising=False)
    monkeypatch.delenv("JAXATTN_COMMAND_BUFFER_UPDATE", raising=False)
    options = paged_step.step_compiler_options()
    assert "CUSTOM_CALL" in options["xla_gpu_enable_command_buffer"]
    assert ("COLLECTIVES" in options["xla_gpu_enable_command_buffer"]) is vmm
    assert (options.get("xla_gpu_command_buffer_update_mode") == "SKIP_PROFILED") is vmm


def test_step_options_turn_the_dot_merger_off_unless_xla_flags_set_it(monkeypatch):
    """DotMerger would concatenate weight matrices that share an input on every step."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert paged_step.step_compiler_options()["xla_gpu_dot_merger_threshold_mb"] == 0
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_dot_merger_threshold_mb=32")
    assert "xla_gpu_dot_merger_threshold_mb" not in paged_step.step_compiler_options()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert paged_step.step_compiler_options() is None


def test_step_options_turn_xla_dependent_launch_on_only_when_asked(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JAXATTN_XLA_DEPENDENT_LAUNCH", raising=False)
    assert "xla_gpu_enable_pdl" not in paged_step.step_compiler_options()
    monkeypatch.setenv("JAXATTN_XLA_DEPENDENT_LAUNCH", "1")
    assert paged_step.step_compiler_options()["xla_gpu_enable_pdl"] is True


def test_step_options_can_leave_library_calls_out_of_the_graphs(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JAXATTN_COMMAND_BUFFER", raising=False)
    inside = paged_step.step_compiler_options()["xla_gpu_enable_command_buffer"].split(",")
    outside = paged_step.step_compiler_options(traced_libraries=False)[
        "xla_gpu_enable_command_buffer"].split(",")
    assert {"CUBLAS", "CUBLASLT"} <= set(inside)
    assert set(outside) == set(inside) - {"CUBLAS", "CUBLASLT"}
