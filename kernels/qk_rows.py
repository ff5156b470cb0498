"""A decode step's query and key rows between their projection and attention, one launch.

Llama 4's attention rotates q and k by position (RoPE layers: HF's interleaved pairs),
normalises each head (``Llama4TextL2Norm``, RoPE layers) and scales q by a position's
temperature (NoPE layers). XLA runs that as two kernels per tensor (a reduction for the
norm, then the elementwise rest), four a RoPE layer, each a few microseconds of launch for
a few KiB at decode. :func:`rope_norm` does all of it in one launch (:func:`reference` is the
XLA composition it replaces, which also runs where the kernel does not: on CPU, prefill-sized
calls), on the FP8 q/k/v projection's one output ``[T, (Hq + 2 Hkv) D]``, where the three
are side by side (slicing q or k out for a kernel would be a copy kernel of XLA's).

The kernel (Mosaic GPU, lane semantics) runs a program per token. Its heads are ``Hq + 2 Hkv``
consecutive rows of ``D`` values (q's, k's, v's): the program loads 64 of them in the wgmma
register layout, where a row's reduction (the norm) stays within a warp and each pair of
elements (2j, 2j + 1) sits in one thread's register, so RoPE's partner is a swap of a
register's halves. The rotated q and k rows go back through shared memory by TMA, each to
its own output, or, with a paged cache (:class:`KVTarget`), k and v straight into the
token's slot of its pools (aliased: updated in place), where XLA ran two scatter kernels.
An FP8 cache's rows are quantised on the way (:mod:`jaxattn.kv_quant`'s arithmetic, per
token and KV head) and their scales stored one by one, where XLA ran the quantisation and
four scatters a layer (with those, a full Scout decode step with an FP8 cache took 7.84 ms
at batch 1 x 8k against the bf16 cache's 7.20).
The token's cos and sin come as :func:`rope_tables` makes them once a step for every layer:
``[T, D]`` rows, each pair's cosine twice and its sine signed [-s, s].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn import kv_quant
from jaxattn.kernels import common

IMPLS = ("auto", "xla", "mosaic")
_ROWS = common.WGMMA_M  # heads per program's register tile


@dataclasses.dataclass(frozen=True)
class QKRowsConfig:
    """When the kernel runs (static)."""

    max_tokens: int = 64  # decode-sized calls; prefill's are XLA's (they stream at bandwidth)


# ---- the reference: the model's XLA ops ----------------------------------------------

def l2norm(x, eps):
    """HF's ``Llama4TextL2Norm`` (and the weightless part of RMSNorm): x * rsqrt(mean(x^2) + eps)."""
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope_tables(inv_freq, positions):
    """RoPE's factors for integer positions [...], ``inv_freq`` [D/2]: (cos, sin) [..., D] f32,
    per element: pair j's angle ``position * inv_freq[j]`` (in f32, as HF), its cosine for both
    elements, its sine as [-sin, +sin]. Made once a step, for every layer."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    sign = jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), freqs.shape[-1])
    return jnp.repeat(jnp.cos(freqs), 2, axis=-1), jnp.repeat(jnp.sin(freqs), 2, axis=-1) * sign


def _swapped(x):
    """Elements (2j, 2j + 1) of the last axis swapped."""
    return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def apply_rope(x, cos, sin):
    """HF's complex rotation: element pairs (2j, 2j+1) are (real, imag) and rotate by position.

    x [..., P, H, D] with (cos, sin) [..., P, D] from :func:`rope_tables`. Interleaved pairs,
    not the half-split (rotate_half) convention of Llama 2/3: out = x * [c, c] + swap(x) *
    [-s, s] per pair, (re c - im s, im c + re s), without the concatenate that stacking the two
    products takes (XLA ran it as a kernel of its own for q and for k in each RoPE layer).
    """
    xf = x.astype(jnp.float32)
    return (xf * cos[..., None, :] + _swapped(xf) * sin[..., None, :]).astype(x.dtype)


def temperature_scale(q, temperature):
    """q [..., P, H, D] times a per-position temperature [..., P] (f32), in q's dtype."""
    t = temperature.astype(jnp.float32)[..., None, None]
    return (q.astype(jnp.float32) * t).astype(q.dtype)


def reference(q, k, rope=None, *, eps=None, temperature=None):
    """What the model does to its projected q [..., P, Hq, D] and k [..., P, Hkv, D]: RoPE by
    ``rope`` (:func:`rope_tables`; None: a NoPE layer), then the per-head L2 norm (``eps``
    None: none), then q times ``temperature`` [..., P] (None: none). -> (q, k)."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if eps is not None:
        q, k = l2norm(q, eps), l2norm(k, eps)
    if temperature is not None:
        q = temperature_scale(q, temperature)
    return q, k


# ---- the kernel -----------------------------------------------------------------------

def _swap_pairs(x, interpret: bool):
    """:func:`_swapped` of ``x`` [64, D] (f32, wgmma layout): each register's two halves, as
    the wgmma layout keeps each pair in one register (no lane needs another's). GPU interpret
    mode cannot run Mosaic code: there, jnp's."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        return _swapped(x)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=plgpu.ShapeDtypeStruct(
        x.shape, x.dtype, layout=plgpu.Layout.WGMMA))
    def swap(ctx, a):
        import numpy as np
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import vector
        from jax.experimental.mosaic import gpu as mgpu

        del ctx
        regs = np.empty_like(a.registers)
        for i, r in np.ndenumerate(a.registers):
            assert ir.VectorType(r.type).shape == [2], a.layout  # (2j, 2j + 1)
            regs[i] = vector.shuffle(r, r, [1, 0])
        return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=a.is_signed)

    return swap(x)


class KVTarget(NamedTuple):
    """Where a layer's new keys and values go: a paged cache's pools ``k_pages``, ``v_pages``
    [P, page_size, Hkv, D] and each token's slot ``slots`` int32 [T] (page * page_size +
    offset; past the pool: a padding token, not written). An FP8 cache (float8_e4m3fn
    pools, :mod:`jaxattn.kv_quant`) adds its scale pools ``k_scale``, ``v_scale`` [P, Hkv,
    page_size] f32: each row is quantised as it is written."""

    k_pages: jax.Array
    v_pages: jax.Array
    slots: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None

    @property
    def pools(self) -> tuple:
        """The pools a write updates: values (and, FP8, scales), in field order."""
        return tuple(p for p in (self.k_pages, self.v_pages, self.k_scale, self.v_scale)
                     if p is not None)


def reference_write(target: KVTarget, k, v, fixed_k_scale: float | None = None,
                    fixed_v_scale: float | None = None) -> tuple:
    """k, v [T, Hkv, D] scattered into their slots (XLA's scatters) -> ``target.pools``
    updated; FP8: each row quantised per token and KV head (:func:`kv_quant.quantize`; k's
    (v's) with ``fixed_k_scale`` (``fixed_v_scale``) where given: the layer's one,
    :mod:`kv_quant`), its values and scale scattered."""
    p, ps, h, d = target.k_pages.shape
    out, scales = [], []
    for pages, scale, new, fixed in ((target.k_pages, target.k_scale, k, fixed_k_scale),
                                     (target.v_pages, target.v_scale, v, fixed_v_scale)):
        if target.fp8:
            new, s = kv_quant.quantize(new, fixed)  # [T, Hkv, D] e4m3, [T, Hkv]
            page, off = target.slots // ps, target.slots % ps  # past the pool: dropped
            scales.append(scale.at[page, :, off].set(s, mode="drop"))
        flat = pages.reshape(p * ps, h, d).at[target.slots].set(new.astype(pages.dtype),
                                                                mode="drop")
        out.append(flat.reshape(pages.shape))
    return (*out, *scales)


def _quantize_rows(x, values_smem, scales_smem, fixed: float | None = None):
    """:func:`kv_quant.quantize` of each row of ``x`` [64, D] (f32, wgmma layout), the same
    arithmetic (``fixed``: its one scale): e4m3 values into ``values_smem`` [64, D], scales
    into ``scales_smem`` [64]."""
    amax = jnp.max(jnp.abs(x), axis=1)
    if fixed is None:
        scale = jnp.minimum(jnp.maximum(amax * (1.0 / kv_quant.FP8_MAX), kv_quant.MIN_SCALE),
                            kv_quant.MAX_SCALE)
        y = x * lax.broadcast_in_dim(1.0 / scale, x.shape, [0])
    else:  # the scales as a row vector of the reduction's layout, for the row store
        scale, y = amax * 0.0 + fixed, x * (1.0 / fixed)
    values_smem[...] = jnp.minimum(jnp.maximum(y, -kv_quant.FP8_MAX), kv_quant.FP8_MAX
                                   ).astype(values_smem.dtype)
    scales_smem[...] = scale


def _kernel_body(token, qkv_ref, *refs, hq: int, hkv: int, rope: bool, eps, temperature: bool,
                 outputs: str, fp8: bool, fixed_k_scale, fixed_v_scale, interpret: bool):
    """``outputs``: "q" (k untouched: a NoPE layer), "qk", or "q+cache" (k and v into the
    cache's pools, aliased refs; ``fp8``: quantised, with their scale pools, k (v) with
    ``fixed_k_scale`` (``fixed_v_scale``) where not None).

    The token's temperature and cache slot are the step's inputs, which no kernel of the
    layer writes, so they are read before the wait for the kernel before (the q/k/v
    projection, whose rows follow it)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    refs = list(refs)
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
    t_ref = refs.pop(0) if temperature else None
    if outputs == "q+cache":
        slots_ref, kp_ref, vp_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        ks_ref, vs_ref = (refs.pop(0), refs.pop(0)) if fp8 else (None, None)
    q_ref, *rest = refs
    k_ref = rest.pop(0) if outputs == "qk" else None
    q_smem, k_smem, v_smem, *scale_smem = rest  # FP8: k and v in e4m3, and their row scales
    heads = hq + 2 * hkv
    rows = qkv_ref.shape[0]
    # The token's heads start the tile, except for the last tokens, whose tile ends at the
    # last row (no read past the array): then they start ``first`` rows into it.
    start = jnp.minimum(token * heads, rows - _ROWS)
    first = token * heads - start

    temp = t_ref[token] if temperature else None
    slot = slots_ref[token] if outputs == "q+cache" else None
    common.dependent_launch(interpret)
    x = plgpu.load(qkv_ref.at[pl.ds(start, _ROWS)], layout=plgpu.Layout.WGMMA, optimized=False)
    if outputs == "q+cache":  # v goes to the cache as it came
        if fp8:
            _quantize_rows(x.astype(jnp.float32), v_smem, scale_smem[1], fixed_v_scale)
        else:
            v_smem[...] = x
    x = x.astype(jnp.float32)
    rounded = lambda v: v.astype(qkv_ref.dtype).astype(jnp.float32)  # the model's casts

    def per_element(table_ref):  # the token's [D] row, the same for every head
        row = plgpu.load(table_ref.at[token], layout=plgpu.Layout.WGMMA.reduce(0),
                         optimized=False)
        return lax.broadcast_in_dim(row, x.shape, [1])

    if rope:  # apply_rope's arithmetic
        x = rounded(x * per_element(cos_ref) + _swap_pairs(x, interpret) * per_element(sin_ref))
    if eps is not None:  # l2norm, per head
        inv = lax.rsqrt(jnp.sum(x * x, axis=1) / x.shape[1] + jnp.float32(eps))
        x = rounded(x * lax.broadcast_in_dim(inv, x.shape, [0]))
    if fp8 and outputs == "q+cache":
        _quantize_rows(x, k_smem, scale_smem[0], fixed_k_scale)
    elif outputs != "q":
        k_smem[...] = x.astype(k_smem.dtype)
    if temperature:  # temperature_scale, q only
        x = x * temp
    q_smem[...] = x.astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(first, hq)], q_ref.at[pl.ds(token * hq, hq)])
    if k_ref is not None:
        plgpu.copy_smem_to_gmem(k_smem.at[pl.ds(first + hq, hkv)],
                                k_ref.at[pl.ds(token * hkv, hkv)])
    if outputs == "q+cache":  # the token's heads are hkv consecutive rows of a pool
        @pl.when((slot >= 0) & (slot < kp_ref.shape[0] // hkv))
        def _():
            for smem, pool, row in ((k_smem, kp_ref, first + hq), (v_smem, vp_ref,
                                                                  first + hq + hkv)):
                plgpu.copy_smem_to_gmem(smem.at[pl.ds(row, hkv)],
                                        pool.at[pl.ds(slot * hkv, hkv)])
            if fp8:  # a token's scales are one per page row, page_size apart: one at a time
                page_size = ks_ref.shape[2]
                page, off = slot // page_size, lax.rem(slot, page_size)
                for scales, pool, row in ((scale_smem[0], ks_ref, first + hq),
                                          (scale_smem[1], vs_ref, first + hq + hkv)):
                    for h in range(hkv):
                        pool[page, h, off] = scales[row + h]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("hq", "hkv", "eps", "fixed_k_scale",
                                             "fixed_v_scale", "interpret"))
def _rope_norm_kernel(qkv, rope, temperature, cache, *, hq: int, hkv: int, eps, fixed_k_scale,
                      fixed_v_scale, interpret: bool):
    """qkv [T, (hq + 2 hkv) D] bf16 -> (q [T, hq, D], k [T, hkv, D] or None if untouched,
    the pools or None): with a :class:`KVTarget` ``cache``, k and v go into its pools (updated
    in place: the kernel writes them through aliased refs) and not to an output."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, d = qkv.shape[0], qkv.shape[1] // (hq + 2 * hkv)
    outputs = "q+cache" if cache is not None else (
        "qk" if rope is not None or eps is not None else "q")
    fp8 = cache is not None and cache.fp8
    operands = [qkv.reshape(-1, d)]  # a row per head
    if rope is not None:
        operands += [a.astype(jnp.float32) for a in rope]
    if temperature is not None:
        operands.append(temperature.astype(jnp.float32))
    out_type = [jax.ShapeDtypeStruct((t * hq, d), qkv.dtype)]
    if outputs == "qk":
        out_type.append(jax.ShapeDtypeStruct((t * hkv, d), qkv.dtype))
    body = functools.partial(_kernel_body, hq=hq, hkv=hkv, rope=rope is not None, eps=eps,
                             temperature=temperature is not None, outputs=outputs, fp8=fp8,
                             fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale,
                             interpret=interpret)

    def rope_norm(*refs):
        body(lax.axis_index("tokens"), *refs)  # (it waits for the kernel before)

    smem = plgpu.SMEM((_ROWS, d), qkv.dtype)  # plain rows: TMA stores from any row
    scratch = (smem, smem, smem)
    if fp8:
        kv8 = plgpu.SMEM((_ROWS, d), kv_quant.FP8)
        scratch = (smem, kv8, kv8, *(plgpu.SMEM((_ROWS,), kv_quant.SCALE_DTYPE),) * 2)
    kernel = plgpu.kernel(rope_norm, out_type=tuple(out_type), grid=(t,),
                          grid_names=("tokens",), scratch_types=scratch)
    if cache is None:
        q, *k = kernel(*operands)
        return q.reshape(t, hq, d), (k[0].reshape(t, hkv, d) if k else None), None

    def in_place(refs):  # the pools as refs: the kernel's writes update them (aliased)
        *pool_refs, q_ref = refs
        q_ref[...] = kernel(*operands, cache.slots, *pool_refs)[0]

    values = tuple(p.reshape(-1, d) for p in cache.pools[:2])  # a row per token and head
    *pools, q = pl.run_state(in_place)((*values, *cache.pools[2:],
                                        jnp.zeros((t * hq, d), qkv.dtype)))
    pools[:2] = [p.reshape(cache.k_pages.shape) for p in pools[:2]]
    return q.reshape(t, hq, d), None, tuple(pools)


def split(qkv, hq: int, hkv: int):
    """A projection's joint output [..., (hq + 2 hkv) D] (or its three parts, [..., H D] each)
    -> q [..., hq, D], k and v [..., hkv, D]."""
    if isinstance(qkv, tuple):
        return tuple(p.reshape(*p.shape[:-1], h, -1) for p, h in zip(qkv, (hq, hkv, hkv)))
    d = qkv.shape[-1] // (hq + 2 * hkv)
    heads = qkv.reshape(*qkv.shape[:-1], hq + 2 * hkv, d)
    return heads[..., :hq, :], heads[..., hq:hq + hkv, :], heads[..., hq + hkv:, :]


def _use_kernel(impl: str, qkv, hq: int, hkv: int, config: QKRowsConfig) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"qk rows impl={impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return False
    heads = hq + 2 * hkv
    d = qkv.shape[-1] // heads
    ok = (qkv.ndim == 2 and qkv.dtype == jnp.bfloat16 and d in (64, 128)
          and heads <= _ROWS <= qkv.shape[0] * heads)
    if impl == "mosaic":
        if not ok:
            raise ValueError(f"the qk rows kernel takes a bf16 q/k/v projection [T, (Hq + 2 Hkv)"
                             f" D], D 64 or 128, Hq + 2 Hkv <= {_ROWS} <= T (Hq + 2 Hkv): got "
                             f"{qkv.shape} {qkv.dtype} with Hq={hq}, Hkv={hkv}")
        return True
    return ok and common.on_hopper() and qkv.shape[0] <= config.max_tokens


def _writes(cache: KVTarget | None, qkv) -> bool:
    """Whether the kernel can write this cache: pools of q's dtype, or FP8 pools at D = 128
    (its e4m3 rows then lie 128 bytes apart in shared memory, as a TMA store's source must)."""
    if cache is None:
        return True
    d = cache.k_pages.shape[-1]
    dtype = kv_quant.FP8 if cache.fp8 else qkv.dtype
    return (cache.k_pages.dtype == cache.v_pages.dtype == dtype
            and cache.slots.shape == qkv.shape[:1] and (not cache.fp8 or d == 128))


def rope_norm(qkv, hq: int, hkv: int, rope=None, *, eps: float | None = None,
              temperature=None, cache: KVTarget | None = None, impl: str = "auto",
              config: QKRowsConfig = QKRowsConfig(), fixed_k_scale: float | None = None,
              fixed_v_scale: float | None = None):
    """:func:`reference` on the q and k of a q/k/v projection's joint output ``qkv`` [..., P,
    (hq + 2 hkv) D] (or its three parts: XLA's ops) (rope :func:`rope_tables` [..., P, D] or
    None; temperature [..., P] or None) -> q [..., P, hq, D], k and v [..., P, hkv, D]. One
    launch for q and k where the kernel runs: on Hopper for bf16 rows of at most
    ``config.max_tokens`` tokens (``qkv`` [T, ...]); elsewhere (and for ``impl="xla"``) XLA's
    ops.

    ``cache`` (:class:`KVTarget`, a paged cache's, T tokens): k and v also go into its
    pools (:func:`reference_write`) -> (q, k, v, ``cache.pools`` updated); where the kernel
    runs, it writes them itself (bf16: two scatter kernels fewer a layer; FP8: the
    quantisation's too) and k, v come back None. ``fixed_k_scale``: an FP8 cache's k rows
    all take that scale (the layer's one: :func:`kv_quant.normed_k_scale` for L2-normed
    keys, ``Llama4ForCausalLM.fix_kv_scales`` for the others); ``fixed_v_scale``: its v
    rows theirs (``fix_kv_scales``)."""
    q, k, v = split(qkv, hq, hkv)
    if cache is None or not cache.fp8:  # only FP8 writes take them: one kernel for the rest
        fixed_k_scale = fixed_v_scale = None
    nothing_to_do = rope is None and eps is None and temperature is None and cache is None
    kernel = (not isinstance(qkv, tuple) and not nothing_to_do
              and _use_kernel(impl, qkv, hq, hkv, config) and _writes(cache, qkv))
    if not kernel:
        q, k = reference(q, k, rope, eps=eps, temperature=temperature)
        return (q, k, v) if cache is None else (q, k, v,
                                                reference_write(cache, k, v, fixed_k_scale,
                                                                fixed_v_scale))
    q, k_out, pools = _rope_norm_kernel(qkv, rope, temperature, cache, hq=hq, hkv=hkv,
                                        eps=None if eps is None else float(eps),
                                        fixed_k_scale=fixed_k_scale,
                                        fixed_v_scale=fixed_v_scale, interpret=common.interpreting())
    if cache is not None:
        return q, None, None, pools
    return q, (k if k_out is None else k_out), v
