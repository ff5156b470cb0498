"""Public attention API: argument checks, then dispatch to a kernel or the reference.

Every check here runs on static shapes/dtypes (and on concrete lengths when
they are not traced), so bad input fails with a ValueError naming the problem
before anything is traced into a kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import executor, kv_quant, planner, reference
from jaxattn.planner import Bounds, Plan

IMPLS = ("auto", "reference", "executor", "mosaic", "interpret")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_HEAD_DIM = 256


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check_common(q, k, v, impl, fp8_kv=False):
    _check(impl in IMPLS, f"impl={impl!r} is not one of {IMPLS}")
    _check(k.shape == v.shape, f"k shape {k.shape} != v shape {v.shape}")
    if not (fp8_kv and kv_quant.is_quantized(k.dtype)):  # an FP8 cache under any q dtype
        _check(q.dtype == k.dtype == v.dtype,
               f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.dtype in DTYPES, f"dtype {q.dtype} unsupported; use bfloat16, float16 or float32")
    hq, d = q.shape[-2:]
    hkv, dk = k.shape[-2:]
    _check(d == dk, f"q head_dim {d} != k head_dim {dk}")
    _check(0 < d <= MAX_HEAD_DIM and d % 8 == 0,
           f"head_dim={d} unsupported: need a multiple of 8 up to {MAX_HEAD_DIM}")
    _check(hkv > 0 and hq % hkv == 0,
           f"num_q_heads={hq} is not a multiple of num_kv_heads={hkv}")


def _concrete(*xs):
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else scale


def _kernel_impl(impl: str, head_dim: int, dtype, bounds: Bounds | None = None,
                 chunk_size: int | None = None, kv_dtype=None) -> str:
    """Resolve ``auto`` and check that a kernel path can run this configuration.

    ``auto`` takes the kernels only where they can serve the configuration
    (Hopper, head_dim/dtype, and the bounds' tile and page sizes, or for the
    contiguous form the chunk size); otherwise the reference. An explicit kernel
    impl that cannot serve it is a ValueError.
    """
    from jaxattn import kernels

    def reason():
        if bounds is not None:
            return kernels.unsupported_reason(bounds, dtype, kv_dtype)
        return kernels.contiguous_unsupported_reason(head_dim, dtype, chunk_size)

    if impl == "auto":
        ok = kernels.on_hopper() and reason() is None
        return "mosaic" if ok else "reference"
    if impl in ("mosaic", "interpret"):
        why = reason()
        dtypes = ", ".join(str(x) for x in kernels.DTYPES)
        _check(why is None, f"impl={impl!r} cannot serve this configuration: {why} (kernels "
               f"support head_dim in {kernels.HEAD_DIMS} and dtypes {dtypes})")
    return impl


def resolve_impl(impl: str, bounds: Bounds, dtype, kv_dtype=None) -> str:
    """The implementation ``impl`` runs as for these bounds, dtype and KV cache dtype
    (``auto`` resolved)."""
    return _kernel_impl(impl, bounds.head_dim, jnp.dtype(dtype), bounds, kv_dtype=kv_dtype)


def attention(q, k, v, *, causal: bool = True, chunk_size: int | None = None, scale=None,
              q_lens=None, kv_lens=None, return_lse: bool = False, impl: str = "auto"):
    """Attention over contiguous batches (research form).

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D]; Hq a multiple of Hkv (GQA).
    Causality is bottom-right: query i sits at position ``kv_len - q_len + i``.
    ``chunk_size=C``: Llama 4 chunked-local attention (a query at p sees keys
    ``[floor(p/C)*C, p]``). ``q_lens``/``kv_lens`` (int32 [B]) mark padding;
    padded query rows come out as zeros. Returns out [B, Lq, Hq, D] and, with
    ``return_lse``, the log-sum-exp [B, Lq, Hq] (f32, natural log).
    """
    _check(q.ndim == 4 and k.ndim == 4, f"expected q [B,Lq,Hq,D] and k [B,Lk,Hkv,D]; got "
           f"{q.shape}, {k.shape}")
    _check_common(q, k, v, impl)
    b, lq, _, d = q.shape
    _check(k.shape[0] == b, f"batch of q ({b}) != batch of k ({k.shape[0]})")
    lk = k.shape[1]
    _check(chunk_size is None or chunk_size > 0, f"chunk_size={chunk_size} must be positive")
    q_lens = jnp.full((b,), lq, jnp.int32) if q_lens is None else q_lens
    kv_lens = jnp.full((b,), lk, jnp.int32) if kv_lens is None else kv_lens
    _check(jnp.shape(q_lens) == (b,) and jnp.shape(kv_lens) == (b,),
           f"q_lens and kv_lens must have shape ({b},)")
    if _concrete(q_lens, kv_lens):
        ql, kl = np.asarray(q_lens), np.asarray(kv_lens)
        _check(((0 <= ql) & (ql <= lq)).all(), f"q_lens must be in [0, Lq={lq}]")
        _check(((0 <= kl) & (kl <= lk)).all(), f"kv_lens must be in [0, Lk={lk}]")
        _check(not causal or (ql <= kl).all(), "causal attention needs q_len <= kv_len "
               "(the new queries are the last q_len of kv_len positions)")
    impl = _kernel_impl(impl, d, q.dtype, chunk_size=chunk_size)
    scale = _scale(scale, d)
    if impl in ("mosaic", "interpret"):
        from jaxattn import kernels

        out, lse = kernels.attention(q, k, v, q_lens, kv_lens, scale=scale, causal=causal,
                                     chunk_size=chunk_size, interpret=impl == "interpret")
    else:  # "executor" has no contiguous form of its own: the reference is the oracle here
        out, lse = reference.attention_reference(q, k, v, q_lens, kv_lens, scale, causal=causal,
                                                 chunk_size=chunk_size)
    return (out, lse) if return_lse else out


def validate_ragged(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *,
                    bounds: Bounds, chunk_size=None, impl="auto", k_scale=None, v_scale=None):
    """All static checks of :func:`ragged_paged_attention`, plus the admission check on concrete lengths."""
    _check(isinstance(bounds, Bounds), f"bounds must be a jaxattn.Bounds, got {type(bounds)}")
    _check(q.ndim == 3 and k_pages.ndim == 4, f"expected q [T,Hq,D] and k_pages "
           f"[num_pages,page_size,Hkv,D]; got {q.shape}, {k_pages.shape}")
    _check_common(q, k_pages, v_pages, impl, fp8_kv=True)
    why = kv_quant.check_scales(k_pages, v_pages, k_scale, v_scale)
    _check(why is None, f"KV cache: {why}")
    t, hq, d = q.shape
    _, page_size, hkv, _ = k_pages.shape
    for name, got, want in (("num_q_heads", hq, bounds.num_q_heads),
                            ("num_kv_heads", hkv, bounds.num_kv_heads),
                            ("head_dim", d, bounds.head_dim), ("page_size", page_size, bounds.page_size)):
        _check(got == want, f"{name}: the arrays have {got}, bounds.{name} is {want}")
    _check(t <= bounds.max_num_batched_tokens,
           f"q has {t} rows > max_num_batched_tokens={bounds.max_num_batched_tokens}")
    _check(page_table.ndim == 2, f"page_table must be [num_seqs, pages_per_seq], got {page_table.shape}")
    s = page_table.shape[0]
    _check(s <= bounds.max_num_seqs, f"page_table has {s} rows > max_num_seqs={bounds.max_num_seqs}")
    _check(page_table.shape[1] >= bounds.pages_per_seq,
           f"page_table too short: {page_table.shape[1]} pages per sequence < "
           f"ceil(max_model_len / page_size) = {bounds.pages_per_seq}")
    _check(jnp.issubdtype(page_table.dtype, jnp.integer), "page_table must be integer")
    _check(jnp.shape(cu_q_lens) == (s + 1,), f"cu_q_lens must have shape ({s + 1},), "
           f"got {jnp.shape(cu_q_lens)}")
    _check(jnp.shape(kv_lens) == (s,), f"kv_lens must have shape ({s},), got {jnp.shape(kv_lens)}")
    _check(jnp.size(num_seqs) == 1, "num_seqs must be a scalar (or shape [1])")
    _check(chunk_size is None or chunk_size == bounds.chunk_size,
           f"chunk_size={chunk_size} must be None or bounds.chunk_size={bounds.chunk_size}")
    if _concrete(cu_q_lens, kv_lens, num_seqs):
        planner.check_admissible(bounds, cu_q_lens, kv_lens, num_seqs)
        n = int(np.asarray(num_seqs).reshape(-1)[0])
        _check(int(np.asarray(cu_q_lens)[n]) <= t,
               f"cu_q_lens[num_seqs]={int(np.asarray(cu_q_lens)[n])} > q rows {t}")
    if _concrete(page_table):
        pt = np.asarray(page_table)
        _check(pt.size == 0 or (pt.min() >= 0 and pt.max() < k_pages.shape[0]),
               f"page_table holds page ids outside [0, {k_pages.shape[0]})")


def ragged_paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *,
                           bounds: Bounds, scale=None, chunk_size=None, return_lse=False,
                           impl: str = "auto", causal: bool = True, plan=None,
                           k_scale=None, v_scale=None, fixed_k_scale: float | None = None,
                           fixed_v_scale: float | None = None, decode_only: bool = False,
                           out_scale: float | None = None):
    """Attention for a packed batch of new tokens over a paged KV cache (serving form).

    q [T, Hq, D]: the new tokens of all sequences, packed; sequence s owns rows
    ``cu_q_lens[s]:cu_q_lens[s+1]``. k_pages, v_pages [num_pages, page_size,
    Hkv, D] (the layout is documented in :mod:`jaxattn.reference`);
    page_table [S, pages_per_seq] int32; kv_lens [S] counts the new tokens
    too; num_seqs: valid sequences (scalar). Mixed prefill, chunked prefill
    and decode sequences go in one call with static shapes. ``plan`` (a ``Plan``, or for
    the kernels a ``jaxattn.kernels.KernelPlan``) may be passed in to share one plan
    between layers of the same kind (a KernelPlan prepared with a ``page_table`` is for
    that page table only).
    An FP8 cache (float8_e4m3fn pages) passes its per-token, per-KV-head scales
    ``k_scale``/``v_scale`` [num_pages, Hkv, page_size] f32 (:mod:`jaxattn.kv_quant`);
    q stays in its own dtype. ``fixed_k_scale``: the caller promises every K scale equals
    it, a power of two (keys written with one scale per layer, as the serving step writes
    Llama 4's: :mod:`jaxattn.kv_quant`): the kernels then neither read K's scale rows nor
    scale per key. ``fixed_v_scale``: the same promise for every V scale.
    ``decode_only``: the caller promises every sequence has at most ``bounds.dq`` new tokens
    (all decode rows) and T <= ``max_num_seqs * dq``: the kernels then skip the prefill pass
    and its merge (a decode step's launches; checked here when the lengths are concrete).
    ``out_scale`` (a power of two): out comes as float8_e4m3fn, ``clip(out / out_scale,
    +-448)`` rounded (:func:`jaxattn.kernels.fp8.quantize_fixed`), the input of an FP8
    output projection. The caller promises no value exceeds ``448 * out_scale`` (past it
    they clip): an attention row is a convex mix of V rows, so a bound on V is one on out
    (``Llama4ForCausalLM.fix_kv_scales``). A decode-only call's kernels write the rows so;
    other calls quantise after them.
    Returns out [T, Hq, D] (rows past the last sequence are 0) and optionally
    lse [T, Hq].
    """
    validate_ragged(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs,
                    bounds=bounds, chunk_size=chunk_size, impl=impl, k_scale=k_scale,
                    v_scale=v_scale)
    if decode_only:
        _check(q.shape[0] <= bounds.max_num_seqs * bounds.dq,
               f"decode_only: {q.shape[0]} rows exceed max_num_seqs * decode_q = "
               f"{bounds.max_num_seqs * bounds.dq}")
        if _concrete(cu_q_lens) and _concrete(num_seqs):
            q_lens = np.diff(np.asarray(cu_q_lens)[:int(np.asarray(num_seqs)) + 1])
            _check(q_lens.size == 0 or q_lens.max() <= bounds.dq,
                   f"decode_only: a sequence has {int(q_lens.max())} new tokens, more than "
                   f"decode_q={bounds.dq}")
    for name, fixed in (("fixed_k_scale", fixed_k_scale), ("fixed_v_scale", fixed_v_scale),
                        ("out_scale", out_scale)):
        if fixed is not None:
            _check(k_scale is not None or name == "out_scale",
                   f"{name} is for an FP8 cache (k_scale given)")
            f = float(fixed)
            _check(kv_quant.MIN_SCALE <= f <= kv_quant.MAX_SCALE and math.frexp(f)[0] == 0.5,
                   f"{name}={fixed} must be a power of two in "
                   f"[{kv_quant.MIN_SCALE}, {kv_quant.MAX_SCALE}]")
    impl = _kernel_impl(impl, q.shape[-1], q.dtype, bounds, kv_dtype=k_pages.dtype)
    scale = _scale(scale, q.shape[-1])
    q, k_pages, v_pages = (jnp.asarray(x) for x in (q, k_pages, v_pages))
    scales = {} if k_scale is None else dict(k_scale=jnp.asarray(k_scale),
                                             v_scale=jnp.asarray(v_scale))
    page_table, cu_q_lens, kv_lens, num_seqs = (
        jnp.asarray(x, jnp.int32) for x in (page_table, cu_q_lens, kv_lens, num_seqs))
    if impl == "reference":
        out, lse = reference.ragged_paged_attention_reference(
            q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, scale,
            causal=causal, chunk_size=chunk_size, **scales)
    else:
        if plan is None:
            plan = planner.plan(bounds, cu_q_lens, kv_lens, num_seqs, chunk_size=chunk_size,
                                  causal=causal)
        if impl == "executor":
            out, lse = executor.execute_plan(plan, q, k_pages, v_pages, page_table, kv_lens,
                                             bounds=bounds, scale=scale, causal=causal,
                                             chunk_size=chunk_size, **scales)
        else:
            from jaxattn import kernels

            out, lse = kernels.ragged_paged_attention(
                q, k_pages, v_pages, page_table, plan, bounds=bounds, scale=scale,
                causal=causal, interpret=impl == "interpret", decode_only=decode_only,
                fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale,
                out_scale=out_scale, **scales)
            out_scale = None  # the kernels' rows are FP8 already
    if out_scale is not None:
        from jaxattn.kernels import fp8

        out = fp8.quantize_fixed(out, float(out_scale))
    return (out, lse) if return_lse else out
