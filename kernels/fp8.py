"""FP8 (float8_e4m3fn) quantisation and the dense FP8 matmul.

The scheme (W8A8, "FP8 dynamic"): weights hold one f32 scale per output channel,
fixed at load time; activations are quantised per token (per row) at run time with
a scale from the row's absolute maximum. A product is

    y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n]

accumulated in f32 from 8-bit operands, so the scales are applied once, in the
epilogue, not per element. The same scheme as compressed-tensors' ``channel`` weights
with ``dynamic`` ``token`` activations (what FP8 Llama 4 checkpoints publish) and as
Meta's ``fp8_mixed`` (per-row weights, per-token activations with an optional cap).

Weights are stored K-major, ``[..., N, K]`` (a Linear's ``[out, in]``): Hopper's
wgmma reads 8-bit operands only K-major, and the layout is what checkpoints hold.

:func:`scaled_matmul` is the dense product (shared expert, dense MLP, attention
projections when they are quantised): ``lax.dot_general`` on float8 operands with
f32 output, which XLA lowers to a cuBLASLt FP8 GEMM on Hopper and computes exactly
(as f32) on the CPU. The grouped product of the routed experts is
:func:`jaxattn.kernels.grouped_matmul.grouped_matmul_fp8`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

DTYPE = jnp.float8_e4m3fn
MAX = float(jnp.finfo(DTYPE).max)  # 448
# Scale floor: an all-zero row quantises to zeros with a finite scale (no 0/0).
MIN_SCALE = 1e-12


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scale"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class Quantized:
    """Rows quantised already (:func:`quantize` along the last axis): ``values`` float8
    [..., K], ``scale`` f32 [...], and ``dtype``, the rows' own (the products' default
    output dtype). The products take it in place of the rows, so rows that several FP8
    matmuls read (the shared and the routed experts' input) are quantised once."""

    values: jax.Array
    scale: jax.Array
    dtype: Any

    @property
    def shape(self):
        return self.values.shape

    @classmethod
    def of(cls, x, scale_ub: float | None = None) -> "Quantized":
        return cls(*quantize(x, -1, scale_ub), jnp.dtype(x.dtype))

    @classmethod
    def fixed(cls, x, scale: float, dtype=None) -> "Quantized":
        """Rows under one static scale (:func:`quantize_fixed`); ``x`` float8 already
        (quantised so by a kernel) or not, ``dtype`` then the rows' own (default x's)."""
        values = x if x.dtype == DTYPE else quantize_fixed(x, scale)
        scales = jnp.full(x.shape[:-1], scale, jnp.float32)  # a constant: no kernel
        return cls(values, scales, jnp.dtype(dtype or x.dtype))

    def take(self, rows, row_scale=None) -> "Quantized":
        """Rows ``rows`` (int [R]), their scales times ``row_scale`` [R] if given: the
        quantisation of ``x[rows] * row_scale[:, None]`` up to that product's rounding."""
        scale = self.scale[rows]
        if row_scale is not None:
            scale = scale * row_scale.astype(jnp.float32)
        return Quantized(self.values[rows], scale, self.dtype)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "row_scale", "col_scale"],
                   meta_fields=["dtype", "stacked"])
@dataclasses.dataclass(frozen=True)
class Unscaled:
    """A product whose epilogue has not run: ``values [..., N]`` (f32 or bf16) times
    ``row_scale [...]`` and ``col_scale [N]`` (f32; None: 1), in ``dtype``. Rows whose row
    scale is 0 are 0, whatever their values (a kernel may leave them unwritten).
    ``stacked``: values ``[S, ..., N]`` and row scales ``[S, ...]`` hold S products of one
    launch (the routed and the shared experts'), this term their sum (each rounded to
    ``dtype``, added in order).

    A decode step's FP8 products (``o_proj``, the experts' down projections) end in the
    residual stream's add, so their scales apply in that add's kernel
    (:func:`jaxattn.kernels.fp8_rows.add_rms_norm_quantize`): XLA's epilogue was a kernel
    of its own after each product. :meth:`resolve` is the same arithmetic in XLA."""

    values: jax.Array
    row_scale: jax.Array | None
    col_scale: jax.Array | None
    dtype: Any
    stacked: bool = False

    def resolve(self) -> jax.Array:
        if self.stacked:
            return sum_terms(tuple(self.unstacked()))
        y = self.values.astype(jnp.float32)
        if self.row_scale is not None:
            y = y * self.row_scale[..., None]
        if self.col_scale is not None:
            y = y * self.col_scale
        y = y.astype(self.dtype)
        if self.row_scale is None:
            return y
        return jnp.where(self.row_scale[..., None] != 0, y, jnp.zeros((), y.dtype))

    def unstacked(self) -> list["Unscaled"]:
        """A stacked term's products, each a term of its own."""
        if not self.stacked:
            return [self]
        rows = [None] * len(self.values) if self.row_scale is None else list(self.row_scale)
        return [Unscaled(v, r, self.col_scale, self.dtype) for v, r in zip(self.values, rows)]

    def reshape(self, *shape) -> "Unscaled":
        """As ``jax.Array.reshape`` (the values' shape, without a stack's leading axis; the
        row scales follow)."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        shape = (self.values.shape[0], *shape) if self.stacked else tuple(shape)
        row_scale = None if self.row_scale is None else self.row_scale.reshape(shape[:-1])
        return Unscaled(self.values.reshape(shape), row_scale, self.col_scale, self.dtype,
                        self.stacked)


def resolve(term) -> jax.Array:
    """An array as it is; an :class:`Unscaled` product with its scales applied."""
    return term.resolve() if isinstance(term, Unscaled) else term


def sum_terms(terms) -> jax.Array:
    """``terms`` (a tuple of arrays / :class:`Unscaled`, or one array) resolved and summed in
    order, each sum rounded to the terms' dtype (as XLA adds them one by one)."""
    if not isinstance(terms, tuple):
        return resolve(terms)
    return functools.reduce(lambda a, b: a + b, map(resolve, terms))


def mask_rows(term, keep):
    """``term`` with the rows where ``keep`` (bool [...]) is False zeroed (an Unscaled
    product's by their row scale, so the select runs where the scales apply)."""
    if isinstance(term, Unscaled) and term.row_scale is not None:
        return dataclasses.replace(term, row_scale=jnp.where(keep, term.row_scale, 0.0))
    return jnp.where(keep[..., None], term, jnp.zeros((), term.dtype))


def quantize(x, axis: int = -1, scale_ub: float | None = None):
    """Symmetric FP8 along ``axis`` (the contraction axis): (values float8, scale f32).

    One scale per slice across ``axis`` (a row of activations, an output channel of
    weights): ``absmax / 448``, so the largest value maps to the largest finite e4m3.
    ``scale_ub`` caps the absmax (Meta's ``activation_scale_ub``): outliers past it clip.
    Values are clamped to +-448 before the cast (e4m3fn has no infinity: an overflowing
    cast gives NaN). The scale has ``x``'s shape without ``axis``.
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=axis)
    if scale_ub is not None:
        amax = jnp.minimum(amax, scale_ub)
    scale = jnp.maximum(amax / MAX, MIN_SCALE)
    q = jnp.clip(xf / jnp.expand_dims(scale, axis), -MAX, MAX).astype(DTYPE)
    return q, scale


def quantize_fixed(x, scale: float):
    """``x`` as float8 under one static ``scale`` (a power of two: the product by its
    inverse is exact), clipped to +-448: rows known in advance to stay under ``448 * scale``
    need no absmax pass, so the kernel that computes them can write them as FP8 (the
    attention output: ``jaxattn.ragged_paged_attention``'s ``out_scale``). The kernels
    call this on their f32 registers, so they and XLA round alike."""
    return jnp.clip(x.astype(jnp.float32) * (1.0 / scale), -MAX, MAX).astype(DTYPE)


def cast_out(x, dtype, scale: float | None = None):
    """A kernel's output rows ``x`` (f32 registers) as stored: ``dtype``, or float8 under the
    static ``scale`` (:func:`quantize_fixed`; ``dtype`` is then float8)."""
    return x.astype(dtype) if scale is None else quantize_fixed(x, scale)


def dequantize(q, scale, axis: int = -1, dtype=jnp.float32):
    """The inverse of :func:`quantize` (up to its rounding)."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def scaled_matmul(x, w, w_scale, *, out_dtype=None, scale_ub: float | None = None,
                  defer: bool = False):
    """``x [..., K]`` (bf16/f32) times the FP8 weight ``w [N, K]`` with ``w_scale [N]``.

    ``x`` is quantised per token here (dynamic), unless it is :class:`Quantized` already.
    Returns ``[..., N]`` in ``out_dtype`` (default ``x.dtype``), or with ``defer`` the
    :class:`Unscaled` product for its consumer to scale.
    XLA's FP8 dot: f32 accumulation, scales applied after.
    """
    xq, xs = (x.values, x.scale) if isinstance(x, Quantized) else quantize(x, -1, scale_ub)
    y = lax.dot_general(xq, w, (((xq.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    product = Unscaled(y, xs, w_scale, jnp.dtype(out_dtype or x.dtype))
    return product if defer else product.resolve()


def scaled_matmul_reference(x, w, w_scale, *, out_dtype=None, scale_ub: float | None = None):
    """:func:`scaled_matmul` from dequantised f32 operands (the semantics, for tests)."""
    xq, xs = quantize(x, -1, scale_ub)
    xd = dequantize(xq, xs)
    wd = dequantize(w, w_scale)
    y = jnp.einsum("...k,nk->...n", xd, wd, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)
