"""The paged KV cache on the device: per-layer page pools and the in-place token write.

Layout: one K and one V pool per layer, each ``[num_pages, page_size,
num_kv_heads, head_dim]`` (token-major inside a page; see
:mod:`jaxattn.reference`). Pools are separate arrays rather than one stacked
``[layers, ...]`` array because a kernel (an XLA custom call) given a slice
of a stacked array would receive a copy of the whole layer's pool.

Two kinds of pools (the hybrid cache): the global layers' pools have
``num_pages`` pages and the chunked-local layers' (``chunked_layers``) have
``num_chunked_pages``: they hold only each sequence's live chunk, so they are
sized by their own rule (:mod:`jaxattn.serve.memory_plan`). Page ``i`` of one
kind means the same tokens in every layer of that kind.

Which pages a sequence owns is decided on the host by the block manager;
a step's tokens arrive with a *slot* each (``page * page_size + offset``,
computed by :mod:`jaxattn.serve.batch`). The serving step writes their K/V rows into
the donated pools in the decode step's q/k rows kernel where it runs, else by XLA's
scatters (:func:`jaxattn.kernels.qk_rows.reference_write`, which :func:`write` and
:func:`write_fp8` call with the pools first).

FP8 cache (``dtype="float8_e4m3fn"``, ``--kv-cache-dtype fp8``): each pool has a
float32 scale pool ``[num_pages, num_kv_heads, page_size]`` beside it
(:mod:`jaxattn.kv_quant`); the write quantises each token's K and V per KV head and
scatters values and scales together, so a page never needs re-quantising.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import kv_quant
from jaxattn.kernels import qk_rows
from jaxattn.serve import allocator


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    shards: int = 1  # devices the KV heads are split over (tensor parallelism)
    chunked_layers: tuple[int, ...] = ()  # layers whose pools are the chunked kind
    num_chunked_pages: int = 0

    def __post_init__(self):
        if self.shards < 1 or self.num_kv_heads % self.shards:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be split over "
                             f"{self.shards} devices")
        if any(not 0 <= i < self.num_layers for i in self.chunked_layers):
            raise ValueError(f"chunked_layers {self.chunked_layers} outside the "
                             f"{self.num_layers} layers")
        object.__setattr__(self, "chunked_layers", tuple(sorted(set(self.chunked_layers))))
        object.__setattr__(self, "dtype", kv_quant.cache_dtype(self.dtype).name)

    @property
    def quantized(self) -> bool:
        """FP8 pages with per-token, per-KV-head scales."""
        return kv_quant.is_quantized(self.dtype)

    @property
    def layer_bytes_per_page(self) -> int:
        """K and V of one page of one layer, on one device (its KV heads), scales included."""
        itemsize = jnp.dtype(self.dtype).itemsize
        heads = self.num_kv_heads // self.shards
        row = self.head_dim * itemsize + (kv_quant.SCALE_DTYPE.itemsize if self.quantized else 0)
        return 2 * self.page_size * heads * row

    @property
    def bytes_per_page(self) -> int:
        """K and V of one page across all layers, on one device (its KV heads)."""
        return self.num_layers * self.layer_bytes_per_page

    @property
    def global_bytes_per_page(self) -> int:
        """A page of the global pools (every layer not chunked)."""
        return (self.num_layers - len(self.chunked_layers)) * self.layer_bytes_per_page

    @property
    def chunked_bytes_per_page(self) -> int:
        return len(self.chunked_layers) * self.layer_bytes_per_page

    def pages_of(self, layer: int) -> int:
        """Pages in ``layer``'s pool."""
        return self.num_chunked_pages if layer in self.chunked_layers else self.num_pages

    @property
    def total_bytes(self) -> int:
        """Per device."""
        return (self.num_pages * self.global_bytes_per_page
                + self.num_chunked_pages * self.chunked_bytes_per_page)


class KVCache(NamedTuple):
    k: tuple  # per layer: [num_pages, page_size, Hkv, D]
    v: tuple
    k_scale: tuple = ()  # FP8 cache: per layer [num_pages, Hkv, page_size] f32; else empty
    v_scale: tuple = ()

    def layer(self, i: int) -> tuple:
        """(k, v, k_scale, v_scale) of layer ``i``; the scales are None without FP8."""
        if not self.k_scale:
            return self.k[i], self.v[i], None, None
        return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]

    def arrays(self) -> tuple:
        return self.k + self.v + self.k_scale + self.v_scale


def allocate(spec: CacheSpec, sharding=None, scale_sharding=None) -> KVCache:
    """Zeroed pools, created directly on the device(s) (with ``sharding``, e.g. split by KV head;
    ``scale_sharding``: the FP8 scale pools', split the same way).

    Zeros matter: kernels read whole pages and mask by logits, and a NaN in a
    never-written slot would survive the mask (NaN * 0); a zero scale times a zero
    value is 0 too. The pools are committed to their device so the first step
    compiles with the same cache key as the steps after it.
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = sharding or default
    makers = {}

    def make(layer, scales=False):
        pages = spec.pages_of(layer)
        if (pages, scales) not in makers:
            if scales:
                shape = kv_quant.scale_shape(pages, spec.page_size, spec.num_kv_heads)
                dtype, where = kv_quant.SCALE_DTYPE, scale_sharding or default
            else:
                shape = (pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
                dtype, where = spec.dtype, sharding
            makers[pages, scales] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=where)
        return makers[pages, scales]()

    layers = range(spec.num_layers)
    scales = {}
    if spec.quantized:
        scales = dict(k_scale=tuple(make(i, True) for i in layers),
                      v_scale=tuple(make(i, True) for i in layers))
    return KVCache(k=tuple(make(i) for i in layers), v=tuple(make(i) for i in layers), **scales)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_budget(budget, free_bytes: int | None = None) -> int:
    """Bytes from ``"4GiB"``, ``"512MB"``, an int, or a fraction in (0, 1] of ``free_bytes``."""
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot parse KV cache budget {budget!r}; use e.g. '4GiB' or 0.8")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "" and value <= 1:
            budget = value
        else:
            return int(value * _UNITS[unit])
    if isinstance(budget, float) and 0 < budget <= 1:
        if free_bytes is None:
            raise ValueError("a fractional KV cache budget needs the free device memory")
        return int(budget * free_bytes)
    if isinstance(budget, (int, np.integer)) and budget > 0:
        return int(budget)
    raise ValueError(f"KV cache budget must be positive bytes or a fraction in (0, 1], got {budget!r}")


def free_device_memory(device=None) -> int | None:
    """Free bytes on ``device`` per its allocator stats (None where unknown, e.g. on CPU)."""
    memory = allocator.device_memory(device or jax.devices()[0])
    return None if memory is None else memory[0]


def pages_for_budget(budget_bytes: int, spec: CacheSpec) -> int:
    return budget_bytes // spec.bytes_per_page


def write(k_pages, v_pages, k_new, v_new, slots):
    """Scatter new K/V rows [T, Hkv, D] into their slots; out-of-range slots are dropped.

    Call under jit with the pools donated: the scatter then updates them in place.
    """
    return qk_rows.reference_write(qk_rows.KVTarget(k_pages, v_pages, slots), k_new, v_new)


def write_fp8(k_pages, v_pages, k_scale, v_scale, k_new, v_new, slots):
    """:func:`write` for the FP8 cache: quantise each new row (per token and KV head) and
    scatter values and scales into their slots. Returns the four updated pools."""
    return qk_rows.reference_write(qk_rows.KVTarget(k_pages, v_pages, slots, k_scale, v_scale),
                                   k_new, v_new)
