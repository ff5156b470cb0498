"""The device side of the engine: a model's jitted step over the paged KV cache it owns.

The engine talks to a model only through :class:`ModelRunner`: the static
bounds, the size of the page pool, the vocabulary size, and ``step(batch, prev_tokens)``
returning the logits of each sequence's last new token. :class:`Llama4Runner`
wraps ``jaxattn.models.llama4``; a test may pass any other runner with the
same surface.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import jax

from jaxattn import cache as kv_cache_lib
from jaxattn.batch import StepBatch
from jaxattn.parallel import ParallelConfig
from jaxattn.scheduler import Bounds

log = logging.getLogger("jaxattn.serve")


class ModelRunner(Protocol):
    bounds: Bounds  # static limits; every step is padded to them
    num_pages: int  # pages in the KV pool the runner owns
    vocab_size: int

    def step(self, batch: StepBatch, prev_tokens: jax.Array | None = None) -> jax.Array:
        """Run one step; return logits [bounds.max_num_seqs, vocab] f32 (device), rows past
        ``batch.num_seqs`` meaningless. Updates the runner's KV cache in place.
        A token id ``-(r + 1)`` in the batch stands for ``prev_tokens[r]`` (int32 [S] on
        the device: the previous step's draws, not yet on the host)."""
        ...


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """The user-facing size knobs (what ``python -m jaxattn.serve`` takes)."""

    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    kv_cache_memory: str | float | int | None = None  # None: 0.8 of free device memory (GPU)

    def resolve_len(self, model_max: int) -> int:
        return self.max_model_len or min(model_max, 8192)


class Llama4Runner:
    """A Llama 4 checkpoint (or an initialised model) with its page pool and jitted step.

    A model whose weights are on a mesh (``model.mesh``) runs tensor / expert
    parallel: its bounds count one device's heads and its pools are split by KV head.
    """

    def __init__(self, model, shape: EngineShape, *, impl: str = "auto", cache_dtype=None,
                 num_pages: int | None = None):
        """``num_pages`` overrides the pool size that ``shape.kv_cache_memory`` would buy."""
        from jaxattn.models import llama4
        from jaxattn.models.llama4 import memory, sharding

        config = model.config
        mesh = model.mesh
        n = sharding.group_size(mesh)
        max_model_len = shape.resolve_len(config.max_position_embeddings)
        self.bounds = llama4.bounds_for(
            config, max_num_seqs=shape.max_num_seqs,
            max_num_batched_tokens=shape.max_num_batched_tokens, max_model_len=max_model_len,
            page_size=shape.page_size, model_parallel=n)
        dtype = cache_dtype or model.dtype
        one_page = llama4.cache_spec(config, num_pages=1, page_size=shape.page_size, dtype=dtype,
                                     model_parallel=n)
        pc = parallel_config(mesh)
        step_bytes = memory.activation_bytes(
            config, pc, num_tokens=shape.max_num_batched_tokens, num_seqs=shape.max_num_seqs,
            dtype=model.dtype) + memory.DEFAULT_RESERVE
        devices = list(mesh.local_devices) if mesh is not None else [jax.devices()[0]]
        self.num_pages = num_pages or num_pages_for(shape.kv_cache_memory, one_page, self.bounds,
                                                    devices=devices, step_bytes=step_bytes)
        self.spec = dataclasses.replace(one_page, num_pages=self.num_pages)
        self.vocab_size = config.vocab_size
        self.model = model
        self.mesh = mesh
        self._step = llama4.make_step_fn(model, self.bounds, impl=impl)
        self._kv = kv_cache_lib.allocate(
            self.spec, sharding=None if mesh is None else sharding.kv_sharding(mesh))
        log.info("KV cache: %d pages of %d tokens (%.1f MiB per device, %s)%s", self.num_pages,
                 shape.page_size, self.spec.total_bytes / 2**20, self.spec.dtype,
                 "" if mesh is None else f"; {pc.describe()} over {mesh.size} devices")

    @classmethod
    def from_pretrained(cls, model_dir: str, shape: EngineShape, *, dtype=None, impl="auto",
                        parallel: ParallelConfig | None = None, mesh=None, device_memory=None):
        """Load a checkpoint, on ``mesh`` (one replica) or on the devices ``parallel`` asks for.

        Before anything is read the configuration is checked: the split must divide
        the model and the memory plan must fit the device (``device_memory``: bytes XLA
        may use per device; default: what the runtime reports). Raises ValueError with
        a one-line reason otherwise.
        """
        from jaxattn import parallel as parallel_lib
        from jaxattn.models import llama4

        pc = parallel or (parallel_config(mesh) if mesh is not None else ParallelConfig())
        if mesh is None and pc.model > 1:
            mesh = parallel_lib.replica_meshes(parallel_lib.make_mesh(
                dataclasses.replace(pc, data=1)))[0]
        config = llama4.Llama4Config.from_pretrained(model_dir)
        plan = memory_plan(config, pc, shape, dtype=dtype or "bfloat16",
                           usable=device_memory, devices=None if mesh is None else mesh.devices.flat)
        if plan is not None and not plan.fits:
            raise ValueError(plan.reason)
        return cls(llama4.load(model_dir, dtype=dtype, mesh=mesh), shape, impl=impl)

    def step(self, batch: StepBatch, prev_tokens: jax.Array | None = None) -> jax.Array:
        logits, self._kv = self._step(self._kv, batch, prev_tokens)
        return logits

    def recover_cache(self) -> bool:
        """After a failed step: rebuild the pools if the step consumed them; True if it did.

        The step donates the pools, so a failure after dispatch can leave them deleted;
        every later step would then fail. Rebuilding loses all cached K/V, which the
        engine answers by recomputing the running sequences.
        """
        if not any(x.is_deleted() for x in self._kv.k + self._kv.v):
            return False
        self._kv = kv_cache_lib.allocate(self.spec)
        return True


def parallel_config(mesh) -> ParallelConfig:
    """The tensor / expert sizes of a replica mesh (None: one device)."""
    from jaxattn import parallel as parallel_lib

    if mesh is None:
        return ParallelConfig()
    return ParallelConfig(tensor=parallel_lib.axis_size(mesh, parallel_lib.TENSOR),
                          expert=parallel_lib.axis_size(mesh, parallel_lib.EXPERT))


def device_limit(devices=None) -> int | None:
    """Bytes XLA may allocate per device (the smallest of ``devices``); None where unknown."""
    limits = []
    # Only this process's devices report statistics (the mesh may span hosts).
    mine = [d for d in (devices or jax.devices()[:1]) if d.process_index == jax.process_index()]
    for d in mine or jax.local_devices()[:1]:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits)


def memory_plan(config, pc: ParallelConfig, shape: EngineShape, *, dtype, usable=None,
                devices=None):
    """The planner's view of this engine (``jaxattn.models.llama4.memory``); None when the
    device memory is unknown (the CPU) and ``usable`` is not given."""
    from jaxattn.models.llama4 import memory

    if usable is not None:
        usable = kv_cache_lib.parse_budget(usable)
    else:
        usable = device_limit(list(devices) if devices is not None else None)
    if usable is None:
        return None
    return memory.plan(config, pc, usable=usable, dtype=dtype,
                       max_num_seqs=shape.max_num_seqs,
                       max_num_batched_tokens=shape.max_num_batched_tokens,
                       max_model_len=shape.resolve_len(config.max_position_embeddings),
                       page_size=shape.page_size, kv_cache_memory=shape.kv_cache_memory)


def num_pages_for(budget, one_page: kv_cache_lib.CacheSpec, bounds: Bounds, *, devices=None,
                  step_bytes: int = 0) -> int:
    """Pages a KV budget buys (per device); a clear error when it cannot hold one full-length
    sequence. ``step_bytes``: what one step needs beside the pool (the default budget leaves it)."""
    from jaxattn.models.llama4 import memory

    frees = [kv_cache_lib.free_device_memory(d) for d in (devices or [None])]
    free = None if any(f is None for f in frees) else min(frees)
    if budget is None:
        # On the GPU: most of what the weights left free, leaving room for a step. On the CPU
        # (free memory unknown): room for every admitted sequence at full length, capped at
        # 256 MiB (but never less than one sequence needs).
        full = bounds.max_num_seqs * bounds.pages_per_seq * one_page.bytes_per_page
        one = bounds.pages_per_seq * one_page.bytes_per_page
        budget = (max(0, memory.default_kv_budget(free, step_bytes)) if free is not None
                  else max(min(full, 256 * 2**20), one))
    try:
        nbytes = kv_cache_lib.parse_budget(budget, free)
    except ValueError as e:
        raise ValueError(f"--kv-cache-memory: {e}") from None
    if free is not None and nbytes > free:
        raise ValueError(f"the KV cache budget ({nbytes / 2**20:.1f} MiB) exceeds the free device "
                         f"memory ({free / 2**20:.1f} MiB); lower --kv-cache-memory")
    host = host_available_memory() if free is None else None
    if host is not None and nbytes > host:
        # On the CPU the pools live in host memory; a budget past what is available would be
        # granted lazily and end with the kernel's OOM killer, not an error message.
        raise ValueError(f"the KV cache budget ({nbytes / 2**20:.1f} MiB) exceeds the available "
                         f"host memory ({host / 2**20:.1f} MiB); lower --kv-cache-memory")
    pages = kv_cache_lib.pages_for_budget(nbytes, one_page)
    if pages < bounds.pages_per_seq:
        raise ValueError(
            f"the KV cache budget ({nbytes / 2**20:.1f} MiB) holds {pages} pages of "
            f"{bounds.page_size} tokens, fewer than one sequence of max_model_len="
            f"{bounds.max_model_len} needs ({bounds.pages_per_seq}); raise --kv-cache-memory or "
            "lower --max-model-len")
    return pages


def host_available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
