"""The FP8 KV cache format: float8_e4m3fn K/V values with a float32 scale per token and KV head.

A K (or V) row of one token and one KV head, ``x[D]``, is stored as
``x8 = round_e4m3(x / s)`` with ``s = max|x| / 448`` (448 is e4m3's largest
finite value), so every stored row spans e4m3's whole range and
``x ~= x8 * s`` (Llama 4's keys and values take one scale per layer instead, written into
the same per-token slots: below). Why per token and head (benchmarks/NOTES-fp8-kv.md):

* no calibration and nothing to redo when a page fills up: a token's scale is
  fixed when it is written, by the step that writes it;
* values have no fixed range, and one scale per page or per tensor taken from the
  values seen so far would let a few large rows flush the small ones to e4m3's
  subnormals, or saturate when a larger row comes (unless the weights bound them: below);
* the scales cost 4 bytes per 128 (D=128) or 64 (D=64) one-byte values: 3% (6%).

Scales lie in [2^-14, 146]: f16's normal range, with ``448 * 146 = 65408`` below f16's
largest, so the kernels can dequantise in f16 arithmetic (``f16(x8) * f16(s)``: one
instruction per two values for the conversion and one for the scale) with every scale exact
to f16's 11 bits and no product overflowing. What that costs: values past 65,408 in
magnitude saturate there (as in an f16 cache), and a row whose largest value is below
``448 * 2^-14 = 0.027`` keeps e4m3's 4 significant bits only down to ~1e-6 (below that its
values are e4m3 subnormals, at most 6e-8 off).

Llama 4's keys and values take one power-of-two scale per layer instead, large enough that
nothing the layer can produce saturates:

* keys an L2 norm bounds (Llama 4's RoPE layers, the chunked-local ones in Scout: each
  head's row has mean square 1, so ``|x| <= sqrt(D)``): :func:`normed_k_scale`, the power
  of two that puts ``sqrt(D)`` just under 448;
* the other keys (Scout's global NoPE layers) and every layer's values: the power of two
  over a bound the layer's weights set (``Llama4ForCausalLM.fix_kv_scales``: a key or
  value is a projection of an RMS-normed row, so at most ``sqrt(hidden)`` times the norm
  of its weights), which sits ~sqrt(hidden) above a typical value.

e4m3 is a floating-point format, so a row's values keep their 4 significant bits at any
scale as long as they sit above its subnormals (``2^-6 * scale``); e4m3's normal range spans
2^15, so a scale sized for the worst case costs typical rows little: what a per-row scale
still buys is an exact row maximum. The rms error is 1.04x (D=128) and 1.06x (D=64) the
per-row scales' on normed Gaussian rows, 1.03x on a NoPE layer's keys at D=128
(tests/serve/test_fp8_kv_cache.py). The scale pools still hold the scale, per token, so
every reader works unchanged; the kernels, told it (``fixed_k_scale``, ``fixed_v_scale``),
copy no scale rows for that side and skip its per-row scaling (for K in the prefill 10-13%
of its time on the H200, benchmarks/NOTES-fp8-kv.md, session 34), and a power of two keeps
its product with the softmax scale (the normalisation) exact, so it is the same arithmetic.

Scale pools are ``[num_pages, num_kv_heads, page_size]`` (head-major inside a
page, unlike the values' ``[num_pages, page_size, num_kv_heads, D]``): one KV
head's scales of one page are then contiguous, so the kernels move them with one
TMA copy of ``page_size * 4`` bytes next to each page's values (a TMA box needs
a contiguous minor dimension of at least 16 bytes; ``[.., page_size, Hkv]``
would make it 4).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

FP8 = jnp.dtype(jnp.float8_e4m3fn)
# Tokens per page for an FP8 cache with pages smaller than a KV tile: the kernels bring each
# page's f32 scale row by TMA, whose shared-memory destination must be 128-byte aligned.
FP8_PAGE_MULTIPLE = 32
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
SCALE_DTYPE = jnp.dtype(jnp.float32)
# The scales' range (module docstring): f16 normal, and FP8_MAX * MAX_SCALE <= f16's max.
# A row of zeros gets MIN_SCALE (its values stay 0) instead of 0/0.
MIN_SCALE = 2.0 ** -14
MAX_SCALE = 146.0
# The narrowest heads whose keys and values take a scale their layer's weights bound: a
# per-row scale stores each row's largest value exactly, which at 128 values a row is a
# small share of its error (the bounded scale's rms error 1.03x per-row's) and at 8 a large
# one (1.34x for keys, 1.47x for values; the head_dim-8 test checkpoint's logits error went
# 2.2% -> 5.5% with both: benchmarks/NOTES-fp8-kv.md, session 35). The kernels take 64 and
# 128, so narrower heads never reach the kernels' fixed-scale paths anyway.
BOUNDED_MIN_HEAD_DIM = 64

# Names the engine and the CLI accept for the FP8 cache.
FP8_NAMES = ("fp8", "fp8_e4m3", "float8_e4m3fn")


def is_quantized(dtype) -> bool:
    """Whether pages of ``dtype`` carry scales (the FP8 cache)."""
    return jnp.dtype(dtype) == FP8


def cache_dtype(name) -> jnp.dtype:
    """The pool dtype for a KV cache dtype name (``fp8`` aliases included)."""
    if isinstance(name, str) and name.lower() in FP8_NAMES:
        return FP8
    return jnp.dtype(name)


def power_of_two_scale(largest: float) -> float | None:
    """The one scale of rows whose values never exceed ``largest`` in magnitude: the
    smallest power of two ``s`` in [MIN_SCALE, MAX_SCALE] with ``448 s >= largest``; None
    where no scale in that range is large enough."""
    s = max(2.0 ** math.ceil(math.log2(max(largest, 2.0 ** -126) / FP8_MAX)), MIN_SCALE)
    return s if s <= MAX_SCALE else None


def normed_k_scale(head_dim: int) -> float:
    """The one scale of L2-normed key rows of ``head_dim`` values (module docstring):
    :func:`power_of_two_scale` of ``sqrt(D) (1 + 2^-7)`` (a row's largest possible value,
    with room for its bf16 rounding). 2^-5 at D = 64 and 128."""
    return power_of_two_scale(math.sqrt(head_dim) * (1 + 2.0 ** -7))


def quantize(x, scale: float | None = None):
    """x [..., D] -> (x8 [..., D] float8_e4m3fn, scale [...] float32), per row of D; with
    ``scale`` (:func:`normed_k_scale`) every row takes that one."""
    xf = x.astype(jnp.float32)
    # Multiplications by reciprocals, as the kernels quantise their query rows
    # (kernels/common.py: quantize_rows): a 1-ulp difference in a scale can flip an e4m3
    # rounding.
    if scale is not None:
        scale = jnp.full(xf.shape[:-1], scale, SCALE_DTYPE)
    else:
        scale = jnp.clip(jnp.abs(xf).max(axis=-1) * (1.0 / FP8_MAX), MIN_SCALE, MAX_SCALE)
    # The product can round a row's max a hair past 448 (or MAX_SCALE bounds it); clip so
    # it saturates, not NaNs.
    x8 = jnp.clip(xf * (1.0 / scale[..., None]), -FP8_MAX, FP8_MAX).astype(FP8)
    return x8, scale


def dequantize(x8, scale, dtype=jnp.float32):
    """x8 [..., D] with scale [...] -> x [..., D] in ``dtype`` (f32 math, then the cast)."""
    return (x8.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def dequantize_f16(x8, scale):
    """x8 [..., D] with scale [...] -> x [..., D] f16 as the kernels' f16 tiles hold it:
    ``f16(x8) * f16(s)`` in f16 arithmetic (exact conversion, the scale and the product
    rounded to f16; finite for every scale this module writes)."""
    return x8.astype(jnp.float16) * scale[..., None].astype(jnp.float16)


def scale_shape(num_pages: int, page_size: int, num_kv_heads: int) -> tuple[int, int, int]:
    return (num_pages, num_kv_heads, page_size)


def check_scales(k_pages, v_pages, k_scale, v_scale) -> str | None:
    """Why (k_pages, v_pages, k_scale, v_scale) is not a valid cache (None when it is)."""
    quantized = is_quantized(k_pages.dtype)
    if quantized != is_quantized(v_pages.dtype):
        return f"k_pages is {k_pages.dtype} but v_pages is {v_pages.dtype}"
    if not quantized:
        if k_scale is not None or v_scale is not None:
            return f"k_scale/v_scale are only for float8_e4m3fn pages, not {k_pages.dtype}"
        return None
    if k_scale is None or v_scale is None:
        return "float8_e4m3fn pages need k_scale and v_scale [num_pages, num_kv_heads, page_size]"
    p, ps, hkv, _ = k_pages.shape
    want = scale_shape(p, ps, hkv)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(s.shape) != want:
            return f"{name} has shape {tuple(s.shape)}, the pages need {want}"
        if jnp.dtype(s.dtype) != SCALE_DTYPE:
            return f"{name} must be float32, got {s.dtype}"
    return None


def quantize_pages(pages, scale: float | None = None):
    """A whole pool [P, page_size, Hkv, D] -> (FP8 pages, scale [P, Hkv, page_size]): the
    cache's layout, which the kernels read (:func:`dequantize_pages` inverts it); ``scale``:
    :func:`quantize`'s."""
    pages8, scale = quantize(pages, scale)
    return pages8, jnp.swapaxes(scale, 1, 2)


def dequantize_pages(pages, scale, dtype=jnp.float32):
    """A whole pool [P, page_size, Hkv, D] with scale [P, Hkv, page_size] -> ``dtype`` pages."""
    return dequantize(pages, jnp.swapaxes(scale, 1, 2), dtype)
