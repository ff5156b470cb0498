"""A decode step's query and key rows between their projection and attention, one launch.

Llama 4's attention rotates q and k by position (RoPE layers: HF's interleaved pairs),
normalises each head (``Llama4TextL2Norm``, RoPE layers) and scales q by a position's
temperature (NoPE layers). XLA runs that as two kernels per tensor (a reduction for the
norm, then the elementwise rest), four a RoPE layer, each a few microseconds of launch for
a few KiB at decode. :func:`rope_norm` does all of it in one (:func:`reference` is the XLA
composition it replaces, which also runs where the kernel does not: on CPU, prefill-sized
calls, f32).

The kernel (Mosaic GPU, lane semantics) sees q and k as rows of one head each, ``[T * H,
D]``, and a 64-row tile of them per warpgroup in the wgmma register layout, where a row's
reduction (the norm) stays within a warp. RoPE pairs elements (2j, 2j + 1), which sit in
one 32-bit word of a bf16 row: the kernel takes each row as ``D / 2`` uint32 words (a
bitcast, no copy) and gets both halves of a pair by shifts (bf16 is the top half of an
f32), so no lane has to fetch its neighbour's element. Each row's cos / sin / temperature
come repeated per head (``[T * H, ...]``, computed once a step: every layer's call shares
them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.kernels import common

IMPLS = ("auto", "xla", "mosaic")
_ROWS = common.WGMMA_M  # rows (heads of tokens) per program


@dataclasses.dataclass(frozen=True)
class QKRowsConfig:
    """When the kernel runs (static)."""

    max_tokens: int = 64  # decode-sized calls; prefill's are XLA's (they stream at bandwidth)


# ---- the reference: the model's XLA ops ----------------------------------------------

def l2norm(x, eps):
    """HF's ``Llama4TextL2Norm`` (and the weightless part of RMSNorm): x * rsqrt(mean(x^2) + eps)."""
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def apply_rope(x, cos, sin):
    """HF's complex rotation: element pairs (2j, 2j+1) are (real, imag) and rotate by position.

    x [..., P, H, D] with cos/sin [..., P, D/2]. Interleaved pairs, not the
    half-split (rotate_half) convention of Llama 2/3.
    """
    # out = x * [c, c] + swap(x) * [-s, s] per pair: (re c - im s, im c + re s), the same
    # values as stacking the two products, without a concatenate, which XLA ran as a kernel
    # of its own for q and for k in each RoPE layer (a decode step's profile, 2026-12-01);
    # elementwise ops and a reverse fuse with the l2norm after.
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(xf.shape)
    c = jnp.repeat(cos, 2, axis=-1)[..., None, :]
    s = (jnp.repeat(sin, 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], jnp.float32),
                                                sin.shape[-1]))[..., None, :]
    return (xf * c + swapped * s).astype(x.dtype)


def temperature_scale(q, temperature):
    """q [..., P, H, D] times a per-position temperature [..., P] (f32), in q's dtype."""
    t = temperature.astype(jnp.float32)[..., None, None]
    return (q.astype(jnp.float32) * t).astype(q.dtype)


def reference(q, k, rope=None, *, eps=None, temperature=None):
    """What the model does to its projected q [..., P, Hq, D] and k [..., P, Hkv, D]: RoPE by
    ``rope`` = (cos, sin) [..., P, D/2] (None: a NoPE layer), then the per-head L2 norm
    (``eps`` None: none), then q times ``temperature`` [..., P] (None: none). -> (q, k)."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if eps is not None:
        q, k = l2norm(q, eps), l2norm(k, eps)
    if temperature is not None:
        q = temperature_scale(q, temperature)
    return q, k


# ---- the kernel -----------------------------------------------------------------------

def _swap_pairs(x, interpret: bool):
    """Elements (2j, 2j + 1) of each row of ``x`` [64, D] (f32, wgmma layout) swapped: a
    register's two halves, where the wgmma layout keeps each such pair (no lane exchanges
    another's). GPU interpret mode cannot run the Mosaic code: there, the same by jnp."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        return x.reshape(x.shape[0], -1, 2)[..., ::-1].reshape(x.shape)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=plgpu.ShapeDtypeStruct(
        x.shape, x.dtype, layout=plgpu.Layout.WGMMA))
    def swap(ctx, a):
        import numpy as np
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import vector
        from jax.experimental import mosaic as mgpu_lib  # noqa: F401
        from jax.experimental.mosaic import gpu as mgpu

        del ctx
        assert all(ir.VectorType(r.type).shape == [2] for r in a.registers.flat), a.layout
        regs = np.empty_like(a.registers)
        for i, r in np.ndenumerate(a.registers):
            regs[i] = vector.shuffle(r, r, [1, 0])
        return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=a.is_signed)

    return swap(x)


def _kernel_body(tile, *refs, tiles_q: int, tiles_k: int, rope: bool, eps, temperature: bool,
                 interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    refs = list(refs)
    q_ref, k_ref = refs.pop(0), refs.pop(0)
    tables = [refs.pop(0) for _ in range(4)] if rope else [None] * 4
    t_ref = refs.pop(0) if temperature else None
    qo_ref, ko_ref = refs

    def load(ref, r0, layout=plgpu.Layout.WGMMA):
        return plgpu.load(ref.at[pl.ds(r0, _ROWS)], layout=layout, optimized=False)

    def rows(x_ref, o_ref, r0, cos_ref, sin_ref, scale_rows):
        x = load(x_ref, r0).astype(jnp.float32)
        d = x.shape[1]
        rounded = lambda v: v.astype(x_ref.dtype).astype(jnp.float32)  # the model's casts
        if rope:  # apply_rope's arithmetic: x * [c, c] + swap(x) * [-s, s]
            x = rounded(x * load(cos_ref, r0) + _swap_pairs(x, interpret) * load(sin_ref, r0))
        if eps is not None:  # l2norm
            inv = lax.rsqrt(jnp.sum(x * x, axis=1) / d + jnp.float32(eps))
            x = rounded(x * lax.broadcast_in_dim(inv, x.shape, [0]))
        if scale_rows:  # temperature_scale
            t = load(t_ref, r0, plgpu.Layout.WGMMA.reduce(1))
            x = x * lax.broadcast_in_dim(t, x.shape, [0])
        o_ref[pl.ds(r0, _ROWS), :] = x.astype(o_ref.dtype)

    cos_q, sin_q, cos_k, sin_k = tables
    pl.when(tile < tiles_q)(lambda: rows(q_ref, qo_ref, tile * _ROWS, cos_q, sin_q,
                                         temperature))
    if tiles_k:
        pl.when(tile >= tiles_q)(lambda: rows(k_ref, ko_ref, (tile - tiles_q) * _ROWS, cos_k,
                                              sin_k, False))


def row_tables(rope, heads: int):
    """(cos, sin) [T, D/2] -> each row's factors for a kernel row of one head, ``[T * heads,
    D]`` f32: cos repeated per pair, sin per pair with apply_rope's signs [-s, s]."""
    cos, sin = (a.astype(jnp.float32) for a in rope)
    c = jnp.repeat(cos, 2, axis=-1)
    s = jnp.repeat(sin, 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], jnp.float32),
                                               sin.shape[-1])
    return tuple(jnp.repeat(a, heads, axis=0) for a in (c, s))


@functools.partial(jax.jit, static_argnames=("eps", "touch_k", "interpret"))
def _rope_norm_kernel(q, k, rope, temperature, *, eps, touch_k: bool, interpret: bool):
    """q [T, Hq, D], k [T, Hkv, D] bf16 -> (q, k) as :func:`reference`; ``touch_k`` False: k
    comes back as it is (a NoPE layer: only q's temperature)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (t, hq, d), hkv = q.shape, k.shape[1]
    tiles_q, tiles_k = t * hq // _ROWS, (t * hkv // _ROWS if touch_k else 0)
    operands = [q.reshape(t * hq, d), k.reshape(t * hkv, d)]  # a row per head
    if rope is not None:  # the same every layer: XLA computes them once a step (CSE)
        operands += [*row_tables(rope, hq), *row_tables(rope, hkv)]
    if temperature is not None:
        operands.append(jnp.repeat(temperature.astype(jnp.float32), hq))
    body = functools.partial(_kernel_body, tiles_q=tiles_q, tiles_k=tiles_k,
                             rope=rope is not None, eps=eps, temperature=temperature is not None,
                             interpret=interpret)

    def rope_norm(*refs):
        body(lax.axis_index("tiles"), *refs)

    out_q, out_k = plgpu.kernel(
        rope_norm, out_type=tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in operands[:2]),
        grid=(tiles_q + tiles_k,), grid_names=("tiles",))(*operands)
    return out_q.reshape(q.shape), (out_k.reshape(k.shape) if touch_k else k)


def _interpreting() -> bool:
    """Whether Pallas kernels traced now run in GPU interpret mode (``force_gpu_interpret_mode``)."""
    from jax._src import config

    return config.pallas_tpu_interpret_mode_context_manager.value is not None


def _use_kernel(impl: str, q, k, config: QKRowsConfig) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"qk rows impl={impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return False
    ok = (q.ndim == 3 and q.dtype == k.dtype == jnp.bfloat16 and q.shape[-1] in (64, 128)
          and q.shape[0] * q.shape[1] % _ROWS == 0 and q.shape[0] * k.shape[1] % _ROWS == 0)
    if impl == "mosaic":
        if not ok:
            raise ValueError(f"the qk rows kernel takes bf16 q [T, Hq, D] and k [T, Hkv, D] "
                             f"with T * Hq and T * Hkv multiples of {_ROWS}: q {q.shape} "
                             f"{q.dtype}, k {k.shape} {k.dtype}")
        return True
    return ok and common.on_hopper() and q.shape[0] <= config.max_tokens


def rope_norm(q, k, rope=None, *, eps: float | None = None, temperature=None,
              impl: str = "auto", config: QKRowsConfig = QKRowsConfig()):
    """:func:`reference` (q [..., P, Hq, D], k [..., P, Hkv, D]; rope (cos, sin) [..., P,
    D/2] or None; temperature [..., P] or None), in one launch where the kernel runs: on
    Hopper for bf16 rows of at most ``config.max_tokens`` tokens ([T, H, D], T * H a multiple
    of 64 for q and k); elsewhere (and for ``impl="xla"``) XLA's ops."""
    if rope is None and eps is None and temperature is None:
        return q, k
    if not _use_kernel(impl, q, k, config):
        return reference(q, k, rope, eps=eps, temperature=temperature)
    return _rope_norm_kernel(q, k, rope, temperature, eps=None if eps is None else float(eps),
                             touch_k=rope is not None or eps is not None,
                             interpret=_interpreting())
