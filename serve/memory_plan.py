"""Per-device memory of a Llama 4 deployment: weights, KV cache, activations, KV capacity.

What the engine will allocate, computed from the config and the mesh alone (no
device, no checkpoint), so a configuration that cannot fit is refused before
anything loads:

* **weights**: every parameter's shard size on this mesh, from the same spec
  table the loader places tensors with (exact, not an estimate).
* **KV cache**: the engine's rule: ``--kv-cache-memory`` if given, else 0.8 of
  what the weights leave free, less if the activations would not fit beside
  it (:func:`default_kv_budget`); one token of one layer costs ``2 * (Hkv /
  devices) * head_dim * itemsize`` bytes per device (FP8: ``head_dim + 4`` bytes
  per head, the values and the token's scale). The budget is split between
  two pools (the hybrid cache, :func:`pool_pages`): the global layers keep every
  token, the chunked-local layers only each sequence's live chunk. The capacity
  in tokens is the global pool's.
* **activations** (an estimate): the live buffers of one step at the largest
  bucket (``max_num_batched_tokens`` tokens, ``max_num_seqs`` logit rows): the
  residual stream, the widest of the attention / MoE / MLP phases of one
  layer, the gathered logits and the sampler's sort. It is an upper-side
  estimate of XLA's buffers, not a measurement.
* **reserve**: a fixed allowance for what is outside the formulas (collective
  buffers, library workspaces, the compiled programs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh

from jaxattn import kv_quant, parallel
from jaxattn.models import llama4
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.serve import allocator
from jaxattn.serve import kv_cache as kv_cache_lib
from jaxattn.serve.config import EngineConfig

# Model configs by name (``scout``), shipped with the model package.
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(llama4.__file__)), "configs")
GiB = 2**30
# Memory per GPU as nvidia-smi reports it (H100 SXM 80 GB HBM3; H200 141 GB HBM3e).
GPUS = {"h100": 81559 * 2**20, "h200": 143771 * 2**20}
DEFAULT_RESERVE = 1 * GiB
ENGINE_KV_FRACTION = 0.8  # the engine's default KV budget: this fraction of the free memory


def named_config(name: str) -> Llama4Config:
    """A config by fixture name (``scout``), a ``config.json`` path or a checkpoint directory."""
    path = os.path.join(CONFIGS, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return Llama4Config.from_hf_dict(json.load(f))
    if os.path.exists(name):
        return Llama4Config.from_pretrained(name)
    known = sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json"))
    raise ValueError(f"unknown config {name!r}: give a config.json, a checkpoint directory or "
                     f"one of {known}")


mem_fraction = allocator.mem_fraction  # the share of GPU memory XLA may use in this process


def _abstract_mesh(pc: parallel.ParallelConfig) -> AbstractMesh:
    return AbstractMesh((pc.expert, pc.tensor), parallel.MODEL)


def weight_bytes(config: Llama4Config, pc: parallel.ParallelConfig, dtype="bfloat16",
                 quantization: str | None = None) -> int:
    """Bytes of weights on one device (exact: each parameter's shard on this mesh).

    ``quantization="fp8"``: the scheme's weights at one byte per element plus their f32
    per-output-channel scales (:mod:`jaxattn.models.llama4.quantization`)."""
    from jaxattn.models.llama4 import quantization as quant_lib
    from jaxattn.models.llama4 import sharding
    from jaxattn.models.llama4.loader import tensor_map

    mesh = _abstract_mesh(pc)
    sharding.check(config, mesh)
    scheme = quant_lib.scheme(quantization)
    itemsize = {"weight": np.dtype(_np_dtype(dtype)).itemsize, "fp8": 1, "scale": 4}
    kinds = {p.path: p.kind for t in tensor_map(config, scheme)
             for part in range(len(t.targets)) for p in t.params(part)}
    total = 0
    for path, (spec, shape) in sharding.spec_table(config, mesh, scheme).items():
        n = int(np.prod(shape, dtype=np.int64))
        for entry in spec:
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            n //= parallel.axis_size(mesh, names)
        total += n * itemsize[kinds[path]]
    return total


def _np_dtype(dtype):
    import jax.numpy as jnp

    return jnp.dtype(dtype)


def _token_spec(config: Llama4Config, pc: parallel.ParallelConfig, dtype) -> kv_cache_lib.CacheSpec:
    chunked = tuple(i for i in range(config.num_hidden_layers) if config.is_chunked(i))
    return kv_cache_lib.CacheSpec(num_layers=config.num_hidden_layers, num_pages=1, page_size=1,
                                  num_kv_heads=llama4.stored_kv_heads(config, pc.model),
                                  head_dim=config.head_dim, dtype=kv_quant.cache_dtype(dtype).name,
                                  shards=pc.model, chunked_layers=chunked)


def kv_bytes_per_token(config: Llama4Config, pc: parallel.ParallelConfig, dtype="bfloat16") -> int:
    """One token's K and V in every layer (the cache without a chunked pool), per device."""
    return _token_spec(config, pc, dtype).bytes_per_page


def pool_pages(budget: int, global_page: int, chunked_page: int, chunked_need: int, *,
               global_cap: int) -> tuple[int, int]:
    """Split one KV budget (bytes) into (global pages, chunked pages).

    ``chunked_need``: the chunked pages all running sequences can hold at once
    (:meth:`jaxattn.Bounds.chunked_pages_for` of ``max_num_seqs``). A sequence's live
    chunked pages are a subset of its logical pages, so the running sequences never
    hold more chunked pages than global ones either: a chunked pool of
    ``min(global pages, chunked_need)`` never runs out before the global pool, so the
    hybrid cache preempts no more than the plain one. The global pool takes the rest.

    ``global_cap``: the global pages every admitted sequence at full length would use, the
    global pool's size when its pages cost nothing (a slice of Scout with no global layer).
    """
    if global_page == 0:
        return global_cap, min(chunked_need, budget // chunked_page) if chunked_page else 0
    if chunked_page == 0:
        return budget // global_page, 0
    pages = (budget - chunked_need * chunked_page) // global_page
    if pages >= chunked_need:
        return pages, chunked_need
    pages = budget // (global_page + chunked_page)
    return pages, pages


def min_kv_budget(global_page: int, chunked_page: int, pages_per_seq: int,
                  chunked_need: int) -> int:
    """The smallest budget whose :func:`pool_pages` hold one ``max_model_len`` sequence."""
    return pages_per_seq * global_page + min(pages_per_seq, chunked_need) * chunked_page


def _bounds(config: Llama4Config, pc: parallel.ParallelConfig, **engine):
    return EngineConfig(**engine).bounds(config, model_parallel=pc.model)


def activation_bytes(config: Llama4Config, pc: parallel.ParallelConfig, *, num_tokens: int,
                     num_seqs: int, dtype="bfloat16", quantization: str | None = None) -> int:
    """Estimated peak of one step's live buffers on one device (see the module docstring)."""
    b = np.dtype(_np_dtype(dtype)).itemsize
    t, s, h, d = num_tokens, num_seqs, config.hidden_size, config.head_dim
    n, tp = pc.model, pc.tensor
    hq, hkv = llama4.local_heads(config, n)
    k = config.num_experts_per_tok
    vocab_local = config.vocab_size // n if config.vocab_size % n == 0 else config.vocab_size
    residual = 3 * t * h * b  # x, the normed input, the block's output before the add
    # q/k/v in the model dtype plus RoPE's f32 copies; output tile and its f32 log-sum-exp.
    attention = t * (hq + 2 * hkv) * d * (b + 4) + t * hq * d * b + t * hq * 4 + 2 * t * h * b
    moe = 0
    if config.moe_layers:
        inter_expert = config.intermediate_size // tp
        inter_shared = config.intermediate_size // n
        # sorted rows, their rotation, the experts' output and its scatter back; gate, up and
        # their product; the shared expert's three; router logits (f32).
        moe = (4 * t * k * h * b + 3 * t * k * inter_expert * b + 3 * t * inter_shared * b
               + t * config.num_local_experts * 4)
        if quantization:  # the 8-bit copies of the rows and their f32 scales, per matmul input
            moe += t * k * (h + inter_expert) + t * (h + inter_shared) + 4 * t * 4
    dense = 3 * t * (config.intermediate_size_mlp // n) * b
    logits = s * vocab_local * 4 + s * config.vocab_size * 4
    sampler = 4 * s * config.vocab_size * 4  # the top-k/top-p sort: values, ids, probs, cumsum
    return residual + max(attention, moe, dense) + logits + sampler


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """One device's memory for a config on a mesh; byte counts are per device."""

    config: Llama4Config
    pc: parallel.ParallelConfig
    label: str  # the device, e.g. "h100 (79.6 GiB)"
    usable: int  # what XLA may allocate on the device
    weights: int
    activations: int
    reserve: int
    kv_budget: int
    kv_bytes_per_token: int  # the global layers' (all layers' without chunked ones)
    page_size: int
    max_model_len: int
    why_not: str | None = None  # set when the configuration cannot run at all
    chunked_bytes_per_token: int = 0  # the chunked-local layers'
    bounds: Any = None  # the engine's jaxattn.Bounds (None when refused before them)
    quantization: str | None = None  # "fp8": FP8 expert / MLP weights
    fraction: float | None = None  # the GPU's share XLA may use, where ``usable`` came from it

    @property
    def chunked_need(self) -> int:
        """Chunked pages the running sequences can hold at most (:func:`pool_pages`)."""
        if not self.chunked_bytes_per_token:
            return 0
        return self.bounds.chunked_pages_for(self.bounds.max_num_seqs)

    @property
    def pools(self) -> tuple[int, int]:
        """(global pages, chunked pages) the budget buys."""
        return pool_pages(max(0, self.kv_budget), self.kv_bytes_per_token * self.page_size,
                          self.chunked_bytes_per_token * self.page_size, self.chunked_need,
                          global_cap=self.bounds.max_num_seqs * self.pages_per_seq)

    @property
    def kv_pages(self) -> int:
        return self.pools[0]

    @property
    def chunked_pages(self) -> int:
        return self.pools[1]

    @property
    def kv_tokens(self) -> int:
        """The capacity: tokens the global pool holds (the chunked pool keeps live chunks)."""
        return self.kv_pages * self.page_size

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def full_length_sequences(self) -> int:
        n = self.kv_pages // self.pages_per_seq
        # ... and whose live chunks (plus a step) the chunked pool holds.
        while n and self.chunked_bytes_per_token and \
                self.bounds.chunked_pages_for(n) > self.chunked_pages:
            n -= 1
        return n

    @property
    def total(self) -> int:
        return self.weights + max(0, self.kv_budget) + self.activations + self.reserve

    @property
    def reason(self) -> str | None:
        """Why this cannot run (None when it fits), as one line naming what to change."""
        if self.why_not:
            return self.why_not
        head = (f"{self.pc.describe()} on {self.label}: "
                f"{_gib(self.weights)} of weights per device")
        step = self.activations + self.reserve
        if self.weights >= self.usable:
            return (f"{head} exceed the {_gib(self.usable)} XLA may use; use more devices "
                    "(--tensor-parallel-size / --expert-parallel-size)")
        if self.weights + step > self.usable:
            return (f"{head} + {_gib(step)} of activations and reserve exceed the "
                    f"{_gib(self.usable)} XLA may use; use more devices or lower "
                    f"--max-num-batched-tokens{self._fraction_hint()}")
        if self.total > self.usable:
            return (f"{head}: the KV cache budget {_gib(self.kv_budget)} + activations and "
                    f"reserve {_gib(step)} exceed the {_gib(self.usable)} XLA may use; lower "
                    "--kv-cache-memory")
        if self.full_length_sequences < 1:
            # The default budget leaves a fifth of the free memory to XLA: a larger one may do.
            most = dataclasses.replace(self, kv_budget=self.usable - self.weights - step)
            budget = (f", or give the KV cache up to {_gib(most.kv_budget)} "
                      f"(--kv-cache-memory)" if most.kv_budget > self.kv_budget
                      and most.full_length_sequences >= 1 else "")
            return (f"{head}: the KV cache ({_gib(self.kv_budget)}, {self.kv_tokens:,} tokens) "
                    f"cannot hold one sequence of --max-model-len {self.max_model_len:,}; lower "
                    f"--max-model-len or use more devices{budget}{self._fraction_hint()}")
        return None

    def _fraction_hint(self) -> str:
        f = mem_fraction() if self.fraction is None else self.fraction
        return (f", or let XLA use more of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9; now "
                f"{f:.2f})" if f < 0.9 else "")

    @property
    def fits(self) -> bool:
        return self.reason is None


def _gib(x: int) -> str:
    return f"{x / GiB:.1f} GiB"


def default_kv_budget(free: int, step_bytes: int) -> int:
    """The engine's KV budget without ``--kv-cache-memory``: 0.8 of the free memory, and
    never so much that one step's activations (+ reserve) no longer fit beside it."""
    return int(min(ENGINE_KV_FRACTION * free, free - step_bytes))


def plan(config: Llama4Config, pc: parallel.ParallelConfig, *, usable: int, label: str = "",
         dtype="bfloat16", kv_dtype=None, max_num_seqs: int = 64,
         max_num_batched_tokens: int = 8192, max_model_len: int = 131072, page_size: int = 16,
         kv_cache_memory=None, reserve: int = DEFAULT_RESERVE,
         quantization: str | None = None) -> MemoryPlan:
    """The memory of one device of a replica. ``usable``: bytes XLA may allocate on it.
    ``quantization``: "fp8" weights (:func:`weight_bytes`)."""
    try:
        weights = weight_bytes(config, pc, dtype, quantization)
    except ValueError as e:
        return MemoryPlan(config, pc, label, usable, 0, 0, reserve, 0, 1, page_size,
                          max_model_len, why_not=str(e))
    act = activation_bytes(config, pc, num_tokens=max_num_batched_tokens, num_seqs=max_num_seqs,
                           dtype=dtype, quantization=quantization)
    spec = _token_spec(config, pc, kv_dtype or dtype)
    b = _bounds(config, pc, max_num_seqs=max_num_seqs, page_size=page_size,
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
    free = usable - weights
    if kv_cache_memory is None:
        kv = default_kv_budget(free, act + reserve)
    else:
        kv = kv_cache_lib.parse_budget(kv_cache_memory, max(free, 1))
    return MemoryPlan(config, pc, label or _gib(usable), usable, weights, act, reserve, kv,
                      spec.global_bytes_per_page, page_size, max_model_len,
                      chunked_bytes_per_token=spec.chunked_bytes_per_page, bounds=b,
                      quantization=quantization)


def gpu_plan(config: Llama4Config, pc: parallel.ParallelConfig, gpu: str, *,
             fraction: float | None = None, **kw) -> MemoryPlan:
    """``plan`` for a named GPU (``h100``/``h200``) at XLA's memory fraction."""
    fraction = mem_fraction() if fraction is None else fraction
    total = GPUS[gpu]
    return dataclasses.replace(
        plan(config, pc, usable=int(total * fraction),
             label=f"{gpu.upper()} {total / GiB:.1f} GiB x {fraction:.2f}", **kw),
        fraction=fraction)


HEADER = ("mesh", "device (usable)", "weights", "KV cache", "activations+reserve", "total",
          "KV tokens", "live-chunk tokens", "full-length seqs", "verdict")


def table(plans: list[MemoryPlan]) -> str:
    """A markdown table, per device."""
    rows = [HEADER, tuple("---" for _ in HEADER)]
    for p in plans:
        ok = p.fits
        rows.append((
            p.pc.describe(), p.label,
            "-" if p.why_not else _gib(p.weights) + (f" {p.quantization}" if p.quantization else ""),
            _gib(max(0, p.kv_budget)) if ok else "-",
            _gib(p.activations + p.reserve), _gib(p.total) if ok else "-",
            f"{p.kv_tokens:,}" if ok else "-",
            f"{p.chunked_pages * p.page_size:,}" if ok else "-",
            f"{p.full_length_sequences} x {p.max_model_len:,}" if ok else "-",
            "fits" if ok else "REFUSED"))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def describe(p: MemoryPlan) -> str:
    """A few lines for one plan (the engine's ``--plan-memory``)."""
    if p.why_not:
        return f"{p.pc.describe()} ({p.pc.world} devices): REFUSED: {p.why_not}"
    lines = [f"{p.pc.describe()} ({p.pc.world} devices) on {p.label}, per device:",
             f"  weights      {_gib(p.weights)}" + (f" ({p.quantization})" if p.quantization
                                                       else ""),
             f"  KV cache     {_gib(max(0, p.kv_budget))} = {p.kv_tokens:,} tokens "
             f"({p.kv_bytes_per_token:,} B/token), {p.full_length_sequences} sequences of "
             f"{p.max_model_len:,}"]
    if p.chunked_bytes_per_token:
        lines.append(f"               chunked-local layers: {p.chunked_pages * p.page_size:,} "
                     f"live-chunk tokens ({p.chunked_bytes_per_token:,} B/token)")
    lines += [
             f"  activations  {_gib(p.activations)} (estimate) + reserve {_gib(p.reserve)}",
             f"  total        {_gib(p.total)} of {_gib(p.usable)}"]
    lines.append("  verdict      " + ("fits" if p.fits else f"REFUSED: {p.reason}"))
    return "\n".join(lines)


# The engine's view -----------------------------------------------------------------------
def for_engine(config: Llama4Config, engine: EngineConfig, *, dtype, usable=None,
               devices=None) -> MemoryPlan | None:
    """The plan of one replica of ``engine``; None when the device memory is unknown (the
    CPU) and ``usable`` (bytes XLA may use per device, or a string like "72GiB") is not given."""
    if usable is not None:
        usable = kv_cache_lib.parse_budget(usable)
    else:
        usable = device_limit(list(devices) if devices is not None else None)
    if usable is None:
        return None
    return plan(config, engine.parallel, usable=usable, dtype=dtype,
                kv_dtype=engine.kv_cache_dtype, max_num_seqs=engine.max_num_seqs,
                max_num_batched_tokens=engine.max_num_batched_tokens,
                max_model_len=engine.resolved_max_model_len(config.max_position_embeddings),
                page_size=engine.page_size, kv_cache_memory=engine.kv_cache_memory,
                quantization=engine.quantization)


def device_limit(devices=None) -> int | None:
    """Bytes XLA may allocate per device (the smallest of ``devices``); None where unknown."""
    limits = []
    # Only this process's devices report statistics (the mesh may span hosts).
    mine = [d for d in (devices or jax.devices()[:1]) if d.process_index == jax.process_index()]
    for d in mine or jax.local_devices()[:1]:
        memory = allocator.device_memory(d)
        if memory is None:
            return None
        limits.append(memory[1])
    return min(limits)


def num_pages_for(budget, one_page: kv_cache_lib.CacheSpec, bounds, *, devices=None,
                  step_bytes: int = 0) -> tuple[int, int]:
    """(global pages, chunked pages) a KV budget buys per device (:func:`pool_pages`); a clear
    error when they cannot hold one full-length sequence. ``one_page``: the cache's spec with
    one page per pool; ``bounds``: the engine's. ``step_bytes``: what one step needs beside
    the pools (the default budget leaves it)."""
    frees = [kv_cache_lib.free_device_memory(d) for d in (devices or [None])]
    free = None if any(f is None for f in frees) else min(frees)
    g, c = one_page.global_bytes_per_page, one_page.chunked_bytes_per_page
    need = bounds.chunked_pages_for(bounds.max_num_seqs) if c else 0
    one = min_kv_budget(g, c, bounds.pages_per_seq, need)
    if budget is None:
        # On the GPU: most of what the weights left free, leaving room for a step. On the CPU
        # (free memory unknown): room for every admitted sequence at full length, capped at
        # 256 MiB (but never less than one sequence needs).
        every = bounds.max_num_seqs * bounds.pages_per_seq * g + need * c
        budget = (max(0, default_kv_budget(free, step_bytes)) if free is not None
                  else max(min(every, 256 * 2**20), one))
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
    pages, chunked = pool_pages(nbytes, g, c, need,
                                global_cap=bounds.max_num_seqs * bounds.pages_per_seq)
    if pages < bounds.pages_per_seq or (c and chunked < bounds.chunk_pages_per_seq):
        raise ValueError(
            f"the KV cache budget ({nbytes / 2**20:.1f} MiB) holds {pages} pages of "
            f"{one_page.page_size} tokens, fewer than one sequence of max_model_len="
            f"{bounds.max_model_len} needs ({bounds.pages_per_seq}, and "
            f"{one / 2**20:.1f} MiB in all); raise --kv-cache-memory or lower --max-model-len")
    return pages, chunked


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
