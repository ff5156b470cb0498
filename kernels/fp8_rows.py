"""Per-token FP8 quantisation fused with the op that makes the rows, one launch per call.

A decode step quantises a few rows (one per token) before every FP8 matmul. XLA does it
in two kernels: a reduction for each row's absmax, then the scale-and-convert (its fusions
cannot give the reduction's result and the converted rows from one kernel), each fused
with whatever produced the rows, and an RMSNorm or a SwiGLU in front adds one more.
At decode each such kernel is a few microseconds of launch for a few KiB of data, and a
full-size Scout step ran ~6 of them per layer. These kernels do each row's whole chain in
one program (one warpgroup per row, the row held in registers: 40 values per thread at
Scout's hidden size, 64 at its intermediate size):

* :func:`quantize`: ``fp8.quantize(x)`` (the attention output before ``o_proj``);
* :func:`rms_norm_quantize`: HF's RMSNorm, then quantise; both results (the router
  reads the bf16 rows, the FP8 matmuls the quantised ones); :func:`add_rms_norm_quantize`
  adds the residual stream's pending update first and returns the sum too (the residual
  add was a kernel of its own, twice per layer, where the norm is this kernel), and can
  route an MoE's rows as well (:func:`route_scales`' results, with its router's weight);
* :func:`swiglu_quantize`: ``silu(gate) * up`` (times a row scale first: the grouped
  matmul leaves its rows' scales to its consumer), then quantise;
* :func:`route_scales`: a top-1 MoE's routing of the rows (on the router's logits) and the
  row scales its by-row experts take.

Each has the XLA composition it replaces as its reference (:func:`reference_quantize`
and friends), which also runs where the kernel does not: on CPU, and for calls of more
than ``RowsConfig.max_rows`` rows (prefill), where XLA's fusions stream large inputs
at bandwidth and two launches are nothing against the rows' bytes.

The kernels are Mosaic GPU (Pallas, lane semantics): one warpgroup per row, which loads
its row's chunks from global memory straight into registers (the strided layout: 8-byte
vector loads of bf16, coalesced; 16-byte under ``RowsConfig.joint_router_sums``), reduces
them across the warpgroup and converts pairs of f32 to e4m3 with ``cvt.rn.satfinite``. No
TMA, tensor cores or pipelining: a decode call moves tens of KiB, and what it saves is
launches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxattn.kernels import common, fp8

IMPLS = ("auto", "xla", "mosaic")


@dataclasses.dataclass(frozen=True)
class RowsConfig:
    """How the row kernels run (static)."""

    max_rows: int = 64  # decode-sized calls only (see the module docstring)
    chunk: int = 1024  # elements per load: 8 per thread of the warpgroup
    # The routing norm (a router given) copies the router's weight [E, K] into shared memory
    # (one bulk copy, 160 KiB at Scout's) before it waits for the kernel before it, where it
    # otherwise reads it from global memory after the wait (from HBM at a layer's first
    # touch). A weight, so no kernel writes it. None: :data:`ROUTER_IN_SMEM`. A router over
    # :data:`ROUTER_SMEM_BYTES` (Maverick's 128 experts: 1.25 MiB) is read from global
    # memory either way.
    router_in_smem: bool | None = None
    # The routing norm's E dot products summed across the warpgroup in one crossing
    # (:func:`_joint_sums`) instead of one `jnp.sum` each (each is shuffles, then a shared
    # scratch between two barriers: 2 E barriers in turn). For E a power of two <= 32;
    # GPU interpret mode (no inline Mosaic GPU) keeps the sums one by one. None:
    # :data:`JOINT_ROUTER_SUMS`.
    joint_router_sums: bool | None = None

    def chunk_for(self, k: int) -> int:
        """The largest power of two that divides ``k``, at most ``chunk``; ValueError if it
        is less than the warpgroup's 128 threads (the strided layout's minimum)."""
        chunk = min(self.chunk, k & -k)
        if chunk < WARPGROUP:
            raise ValueError(f"row length {k} is not a multiple of {WARPGROUP}")
        return chunk


WARPGROUP = 128
# RowsConfig.router_in_smem's default: on since session 49, where 12 of Scout's layers took
# 2.758 ms a batch-1 decode step with it against 2.781 / 2.784 without (H100, programmatic
# dependent launch; the same tokens and logprobs bit for bit). benchmarks.multigpu
# --no-router-in-smem turns it off; read when a kernel is traced.
ROUTER_IN_SMEM = True
# RowsConfig.joint_router_sums' default: on since session 61, where the routing norm took
# 6.94 / 6.98 us with it against 7.49 / 7.52 without (two runs, H100, CUPTI), and 12 of
# Scout's layers decoded the same tokens and logprobs bit for bit with and without it
# (benchmarks/NOTES-fp8.md). benchmarks.multigpu --no-joint-router-sums turns it off.
JOINT_ROUTER_SUMS = True
ROUTER_SMEM_BYTES = 192 * 1024  # of the SM's 227 KiB; the kernel keeps its rows in registers


def _use_kernel(impl: str, rows: int, k: int, config: RowsConfig) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"row quantisation impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return common.on_hopper() and rows <= config.max_rows and k % WARPGROUP == 0
    if impl == "xla":
        return False
    config.chunk_for(k)  # the row length's check, before tracing the kernel
    return True


# ---- references: the XLA compositions -------------------------------------------------

def reference_quantize(x, scale_ub=None) -> fp8.Quantized:
    return fp8.Quantized.of(x, scale_ub)


def reference_rms_norm(x, weight, eps):
    """HF's Llama4TextRMSNorm: normalise in f32, cast to x's dtype, then times the weight."""
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return normed * weight


def reference_rms_norm_quantize(x, weight, eps, scale_ub=None):
    h = reference_rms_norm(x, weight, eps)
    return h, fp8.Quantized.of(h, scale_ub)


def reference_add_rms_norm_quantize(x, delta, weight, eps, scale_ub=None):
    x = x + fp8.sum_terms(delta)
    return (x, *reference_rms_norm_quantize(x, weight, eps, scale_ub))


def reference_route(h, router, valid=None):
    """A top-1 router on the normed rows ``h`` [..., K]: the logits ``h @ router.T`` in h's
    dtype (the MoE's bf16 Linear), then (the top logit as f32, its expert as int32; the
    first of equals), each [...]. ``valid`` (bool [...]): rows where it is False (a step's
    bucket padding) get expert E, past the last (no expert), and top logit +inf: a column
    more in the argmax, which its reduction kernel fuses, where a select after it was a
    kernel of its own."""
    logits = jax.lax.dot_general(h, router.astype(h.dtype), (((h.ndim - 1,), (1,)), ((), ())))
    if valid is not None:
        padding = jnp.where(valid, -jnp.inf, jnp.inf).astype(logits.dtype)
        logits = jnp.concatenate([logits, padding[..., None]], axis=-1)
    return logits.max(-1).astype(jnp.float32), jnp.argmax(logits, -1).astype(jnp.int32)


def reference_route_scales(h, router, token_scale, valid=None):
    """A top-1 MoE's routing of the normed rows ``h`` [R, K] (:func:`reference_route`) as a
    decode step's by-row experts take it: (each row's
    expert, int32 [R], E for a padding row; the row scales [2R] f32 of the routed rows'
    input, then the shared expert's). The routed rows are the token's quantised row (scale
    ``token_scale`` [R]) times its router score ``sigmoid(top logit)`` in h's dtype (HF
    scales the experts' input, not their output), folded into the scale; a padding row's
    routed scale is 0 (no product of it counts: :class:`fp8.Unscaled`'s rule)."""
    top, expert = reference_route(h, router, valid)
    score = jax.nn.sigmoid(top.astype(jnp.float32)).astype(h.dtype).astype(jnp.float32)
    routed = jnp.where(expert < router.shape[0], token_scale * score, 0.0)
    return expert, jnp.concatenate([routed, token_scale.astype(jnp.float32)])


def reference_swiglu(gate, up, row_scale=None):
    """``silu(gate) * up`` in gate's dtype, each first scaled by ``row_scale[..., None]``
    (the model's ops; the kernel computes the same in f32, without their bf16 roundings)."""
    if row_scale is not None:
        gate = (gate * row_scale[..., None]).astype(up.dtype)
        up = (up * row_scale[..., None]).astype(gate.dtype)
    return up * jax.nn.silu(gate)


def reference_swiglu_quantize(gate, up, row_scale=None, scale_ub=None):
    """Rows whose ``row_scale`` is 0 come out 0 with scale 0 (whatever their gate and up: a
    grouped matmul leaves rows of no expert unwritten), so a product of them is 0 as well
    (:class:`fp8.Unscaled`'s rule)."""
    if row_scale is None:
        return fp8.Quantized.of(reference_swiglu(gate, up), scale_ub)
    keep = (row_scale != 0)[..., None]
    gate, up = (jnp.where(keep, t, jnp.zeros((), t.dtype)) for t in (gate, up))
    q = fp8.Quantized.of(reference_swiglu(gate, up, row_scale), scale_ub)
    return fp8.Quantized(q.values, jnp.where(keep[..., 0], q.scale, 0.0), q.dtype)


# ---- the kernels ----------------------------------------------------------------------

def _quantize_chunks(chunks, q_row, s_row, chunk: int, scale_ub, keep=None):
    """Quantise a row held in registers, ``chunks`` (f32 arrays of ``chunk`` values, in
    order), into ``q_row`` [K] / ``s_row`` [1], with :func:`fp8.quantize`'s arithmetic
    (absmax / 448, floored; divide, clip, cast). The chunks combine elementwise first, so
    the warpgroup reduces (through shared memory) once. ``keep`` (a bool scalar) False:
    the scale stored is 0 (the chunks are zeros then). Returns the row's scale (as if kept)."""
    amax = jnp.abs(chunks[0])
    for c in chunks[1:]:
        amax = jnp.maximum(amax, jnp.abs(c))
    amax = jnp.max(amax)
    if scale_ub is not None:
        amax = jnp.minimum(amax, jnp.float32(scale_ub))
    scale = jnp.maximum(amax / fp8.MAX, jnp.float32(fp8.MIN_SCALE))
    for i, c in enumerate(chunks):
        q_row[pl.ds(i * chunk, chunk)] = jnp.clip(c / scale, -fp8.MAX, fp8.MAX).astype(fp8.DTYPE)
    s_row[...] = jnp.broadcast_to(scale if keep is None else
                                  jnp.where(keep, scale, jnp.float32(0)), (1,))
    return scale


def _joint_sums_fit(n: int) -> bool:
    """Whether :func:`_joint_sums` takes ``n`` parts: a power of two, at most a warp's 32."""
    return 1 <= n <= 32 and not n & (n - 1)


def _joint_sums(parts, scratch):
    """``[jnp.sum(p) for p in parts]`` for f32 arrays in the warpgroup's strided layout, as
    f32 scalars, crossing the warpgroup once: each thread sums its own values, then each
    warp halves its list of partial sums in a butterfly across its lanes (a lane keeps one
    half and adds its partner's, 16 shuffles for 16 sums where one sum at a time takes 5
    each), and the warps meet in ``scratch`` (SMEM f32 [4 * len(parts)]) behind one
    barrier. ``len(parts)``: a power of two, at most 32. The order of the additions is not
    `jnp.sum`'s, so the last bits may differ. GPU only (no inline Mosaic GPU in GPU
    interpret mode)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector

    n = len(parts)
    if not _joint_sums_fit(n):
        raise ValueError(f"joint sums take a power of two of at most 32 parts, got {n}")
    (size,) = parts[0].shape  # 128 threads' vectors of up to 8 (16-byte loads of bf16)
    layout = plgpu.Layout.WG_STRIDED(parts[0].shape, vec_size=min(8, size // 128))
    splat = plgpu.ShapeDtypeStruct((), jnp.float32, layout=plgpu.Layout.WG_SPLAT)

    @plgpu.inline_mgpu(arg_types=((layout,) * n, plgpu.RefType()), return_type=(splat,) * n)
    def sums(_, arrays, scratch_ref):
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        const = lambda v: arith.constant(i32, v)
        element = lambda vec, i: vector.extract(vec, dynamic_position=[],
                                                static_position=ir.DenseI64ArrayAttr.get([i]))
        vals = []
        for a in arrays:  # this thread's values of each part, summed
            acc = functools.reduce(arith.addf, a.registers.flat)
            vals.append(functools.reduce(arith.addf, [
                element(acc, i) for i in range(ir.VectorType(acc.type).shape[0])]))
        thread = mgpu_utils.thread_idx()
        lane = arith.remui(thread, const(32))
        warp = arith.divui(arith.remui(thread, const(128)), const(32))
        part = const(0)  # which part this lane's value sums, once one is left
        for dist in (16, 8, 4, 2, 1):
            if len(vals) > 1:  # halve: lanes with the `dist` bit set keep the upper half
                half = len(vals) // 2
                upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, const(dist)),
                                   const(0))
                part = arith.addi(part, arith.select(upper, const(half), const(0)))
                vals = [arith.addf(arith.select(upper, vals[e + half], vals[e]),
                                   mgpu_utils.shfl_bfly(
                                       arith.select(upper, vals[e], vals[e + half]), dist))
                        for e in range(half)]
            else:  # one part a lane: add the lanes that hold the same one
                vals = [arith.addf(vals[0], mgpu_utils.shfl_bfly(vals[0], dist))]
        slot = arith.addi(arith.muli(warp, const(n)), part)
        memref.store(vals[0], scratch_ref, [arith.index_cast(index, slot)])
        mgpu_utils.warpgroup_barrier()
        out = []
        for e in range(n):  # the 4 warps' sums of part e, as jnp.sum's tree adds them
            w = [memref.load(scratch_ref, [arith.constant(index, k * n + e)]) for k in range(4)]
            out.append(mgpu.FragmentedArray.splat(
                arith.addf(arith.addf(w[0], w[1]), arith.addf(w[2], w[3])), ()))
        return tuple(out)

    return list(sums(tuple(parts), scratch))


def _top1(logits):
    """(top logit, its index as int32) of a row's logits (f32 scalars, in order): the first
    of equal logits wins, as argmax."""
    best, best_e = logits[0], jnp.int32(0)
    for e, logit in enumerate(logits[1:], 1):
        best_e = jnp.where(logit > best, jnp.int32(e), best_e)
        best = jnp.maximum(best, logit)
    return best, best_e


def _store_route(expert_ref, scales_ref, row, rows: int, top, expert, keep, scale,
                 num_experts: int, dtype):
    """:func:`reference_route_scales`' outputs for row ``row`` of ``rows`` from its top
    logit and expert, whether it is a token (``keep``) and its token scale."""
    score = (1.0 / (1.0 + jnp.exp(-top))).astype(dtype).astype(jnp.float32)
    expert_ref[pl.ds(row, 1)] = jnp.broadcast_to(
        jnp.where(keep, expert, jnp.int32(num_experts)), (1,))
    scales_ref[pl.ds(row, 1)] = jnp.broadcast_to(jnp.where(keep, scale * score, 0.0), (1,))
    scales_ref[pl.ds(rows + row, 1)] = jnp.broadcast_to(scale, (1,))


def _launch(body, rows: int, out_shapes, name: str, scratch=(), waits: bool = True):
    """One warpgroup per row: ``body(row, *refs)`` over GMEM refs (inputs, then outputs,
    then the ``scratch`` shapes' SMEM refs). ``name`` names the CUDA kernel
    (``<name>_mosaic_gpu_kernel``), so that a step's profile tells the row kernels apart.
    ``waits`` False: ``body`` calls :func:`common.dependent_launch` itself."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(*refs):
        if waits:
            common.dependent_launch()
        body(jax.lax.axis_index("rows"), *refs)

    kernel.__name__ = kernel.__qualname__ = name

    # No automatic barriers around stores: Pallas puts a warpgroup barrier before and after
    # every ref store (for stores other threads read back), two per output chunk here, and
    # these kernels never read what they store; their reductions sync on their own.
    return plgpu.kernel(kernel, out_type=out_shapes, grid=(rows,), grid_names=("rows",),
                        scratch_types=scratch,
                        compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True))


def _outs(r, k, dtype=None):
    """Out shapes: (rows in ``dtype``,) FP8 rows, scales [R]."""
    return ((jax.ShapeDtypeStruct((r, k), dtype),) if dtype is not None else ()) + (
        jax.ShapeDtypeStruct((r, k), fp8.DTYPE), jax.ShapeDtypeStruct((r,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("scale_ub", "config"))
def _quantize_kernel(x, *, scale_ub, config: RowsConfig):
    r, k = x.shape
    chunk = config.chunk_for(k)

    def body(row, x_ref, q_ref, s_ref):
        chunks = [x_ref[row, pl.ds(c * chunk, chunk)].astype(jnp.float32)
                  for c in range(k // chunk)]
        _quantize_chunks(chunks, q_ref.at[row], s_ref.at[pl.ds(row, 1)], chunk, scale_ub)

    return _launch(body, r, _outs(r, k), "quantize")(x)


def _flat_terms(terms, r: int):
    """``terms`` (arrays or :class:`fp8.Unscaled`, [..., K]) as the kernel's operands: the
    arrays (values [S * R, K], then the row scales [S * R] and column scales [K] it has)
    and each term's (has row scales, has column scales, S), static. S: the products a
    stacked term sums (1 for the others); row s * R + i of its arrays is product s's row i."""
    arrays, kinds = [], []
    for t in terms:
        u = t if isinstance(t, fp8.Unscaled) else fp8.Unscaled(t, None, None, t.dtype)
        stack = u.values.shape[0] if u.stacked else 1
        arrays.append(u.values.reshape(stack * r, -1))
        arrays += [s.reshape(-1).astype(jnp.float32) for s in (u.row_scale, u.col_scale)
                   if s is not None]
        kinds.append((u.row_scale is not None, u.col_scale is not None, stack))
    return arrays, tuple(kinds)


@functools.partial(jax.jit, static_argnames=("kinds", "eps", "scale_ub", "config"))
def _rms_norm_quantize_kernel(x, weight, *terms, router=None, valid=None, kinds=(), eps,
                              scale_ub, config: RowsConfig):
    """With ``terms`` (:func:`_flat_terms`): normalises ``x + delta``, delta the terms'
    sum (:func:`fp8.sum_terms`'s arithmetic and roundings), and returns that sum first.
    With ``router`` [E, K] (x's dtype) and ``valid`` [R] int32: also
    :func:`reference_route_scales` of the normed rows and their FP8 scales, as two more
    outputs (each row's E dot products reduce over the warpgroup).

    Every load comes before the first store: the loads after a store to global memory
    may alias it, so they are not issued ahead of it, and a row's chunks interleaving
    loads and stores wait a memory round trip each (the decode step's ~5 per row)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    r, k = x.shape
    chunk = config.chunk_for(k)
    at = [pl.ds(c * chunk, chunk) for c in range(k // chunk)]
    rounded = lambda v: v.astype(x.dtype).astype(jnp.float32)
    smem_router = (router is not None
                   and router.size * router.dtype.itemsize <= ROUTER_SMEM_BYTES
                   and (ROUTER_IN_SMEM if config.router_in_smem is None
                        else config.router_in_smem))
    experts = 0 if router is None else router.shape[0]
    joint = ((JOINT_ROUTER_SUMS if config.joint_router_sums is None
              else config.joint_router_sums)
             and _joint_sums_fit(experts) and not common.interpreting())

    def body(row, x_ref, w_ref, *rest):
        if joint:
            *rest, sums_smem = rest
        # The weights (the router's copy, the norm's), then the wait for the kernel before:
        # their reads overlap its end under programmatic dependent launch.
        if smem_router:
            *rest, r_smem, r_landed = rest
            # [E * K], flat and in bounds: one bulk copy (a tiled TMA box is <= 256 a side)
            plgpu.copy_gmem_to_smem(rest[len(terms)], r_smem, r_landed,
                                    oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
        ws = [w_ref[a].astype(jnp.float32) for a in at]
        common.dependent_launch()
        term_refs, rest = rest[:len(terms)], rest[len(terms):]
        r_ref, v_ref, *rest = rest if router is not None else (None, None, *rest)
        sum_ref, *rest = rest if terms else (None, *rest)
        h_ref, q_ref, s_ref, *route_refs = rest

        def term(refs, has_row, has_col, stack):  # Unscaled.resolve, chunk by chunk
            v_ref, *scales = refs
            rs_ref = scales.pop(0) if has_row else None
            cs = scales.pop(0) if has_col else None
            out = None
            for s in range(stack):  # a stacked term's products, summed in order
                i = s * r + row
                rs = rs_ref[i] if has_row else None
                product = []
                for a in at:
                    v = v_ref[i, a].astype(jnp.float32)
                    if has_row:
                        rs_v = jnp.broadcast_to(rs, v.shape)
                        v = v * rs_v
                    if has_col:
                        v = v * cs[a]
                    v = rounded(v)
                    product.append(jnp.where(rs_v != 0, v, 0.0) if has_row else v)
                out = product if out is None else [rounded(o + p) for o, p in zip(out, product)]
            return out

        xs = [x_ref[row, a].astype(jnp.float32) for a in at]
        refs, delta = list(term_refs), None
        for has_row, has_col, stack in kinds:
            n = 1 + has_row + has_col
            t = term(refs[:n], has_row, has_col, stack)
            refs = refs[n:]
            delta = t if delta is None else [rounded(d + v) for d, v in zip(delta, t)]
        if delta is not None:
            xs = [rounded(xc + d) for xc, d in zip(xs, delta)]
        sq = xs[0] * xs[0]
        for xc in xs[1:]:
            sq = sq + xc * xc
        inv = jax.lax.rsqrt(jnp.sum(sq) / k + jnp.float32(eps))
        # HF's roundings: to x's dtype, then times the weight.
        hs = [rounded(rounded(xc * inv) * wc) for xc, wc in zip(xs, ws)]
        # The sum in x's dtype now: half the registers held across the router's work.
        sums = [xc.astype(x.dtype) for xc in xs] if delta is not None else None
        if r_ref is not None:  # the router's loads, still before the stores
            # Every expert's loads and products come first, then the E reductions: each
            # reduction crosses the warpgroup through shared memory behind a barrier, which
            # loads are not moved across, so loads between the reductions (session 13's
            # form) would wait a memory round trip per expert (the likely reason it took
            # 13.9 us a call against 3.9 without the router; untimed since). Per thread:
            # E x chunk / 128 f32 partial sums (128 registers at Scout's E=16).
            if smem_router:
                plgpu.barrier_wait(r_landed)
                load = lambda e, i: r_smem[pl.ds(e * k + i * chunk, chunk)]
            else:
                load = lambda e, i: r_ref[e, at[i]]
            dots = []
            for e in range(router.shape[0]):
                dot = hs[0] * load(e, 0).astype(jnp.float32)
                for i, hc in enumerate(hs[1:], 1):
                    dot = dot + hc * load(e, i).astype(jnp.float32)
                dots.append(dot)
            logits = _joint_sums(dots, sums_smem) if joint else [jnp.sum(d) for d in dots]
            top = _top1([logit.astype(x.dtype).astype(jnp.float32) for logit in logits])
            keep = v_ref[row] != 0
        if sums is not None:
            for a, sc in zip(at, sums):
                sum_ref[row, a] = sc
        for a, hc in zip(at, hs):
            h_ref[row, a] = hc.astype(x.dtype)
        scale = _quantize_chunks(hs, q_ref.at[row], s_ref.at[pl.ds(row, 1)], chunk, scale_ub)
        if r_ref is not None:
            _store_route(*route_refs, row, r, *top, keep, scale, router.shape[0], x.dtype)

    outs = _outs(r, k, x.dtype)
    if terms:
        outs = (jax.ShapeDtypeStruct((r, k), x.dtype), *outs)
    operands = (x, weight, *terms)
    if router is not None:
        outs += (jax.ShapeDtypeStruct((r,), jnp.int32),  # each row's expert, its scales
                 jax.ShapeDtypeStruct((2 * r,), jnp.float32))
        operands = (*operands, router.reshape(-1) if smem_router else router, valid)
    name = "_".join(["add"] * bool(terms) + ["rms_norm_quantize"] + ["route"] * (router is not None))
    scratch = (plgpu.SMEM((router.size,), x.dtype), plgpu.Barrier()) if smem_router else ()
    scratch += (plgpu.SMEM((4 * experts,), jnp.float32),) if joint else ()
    return _launch(body, r, outs, name, scratch, waits=False)(*operands)


@functools.partial(jax.jit, static_argnames=("scale_ub", "config"))
def _swiglu_quantize_kernel(gate, up, row_scale, *, scale_ub, config: RowsConfig):
    """gate, up [R, K] (or gate [R, 2K] holding both, up None); row_scale [R] f32 or None."""
    r, k = gate.shape[0], gate.shape[1] // (1 if up is not None else 2)
    chunk = config.chunk_for(k)
    up_offset = 0 if up is not None else k

    def body(row, g_ref, u_ref, *rest):
        rs_ref, q_ref, s_ref = rest if row_scale is not None else (None, *rest)

        rs = rs_ref[row] if rs_ref is not None else None

        def swiglu(c):  # in f32 throughout: XLA's bf16 roundings between the ops are not kept
            g = g_ref[row, pl.ds(c * chunk, chunk)].astype(jnp.float32)
            u = u_ref[row, pl.ds(up_offset + c * chunk, chunk)].astype(jnp.float32)
            if rs is not None:  # a row scale of 0: a zero row, whatever was there (NaN)
                keep = jnp.broadcast_to(rs, g.shape) != 0
                g, u = (jnp.where(keep, t * rs, 0.0) for t in (g, u))
            return u * g * jax.nn.sigmoid(g)

        _quantize_chunks([swiglu(c) for c in range(k // chunk)], q_ref.at[row],
                         s_ref.at[pl.ds(row, 1)], chunk, scale_ub,
                         None if rs is None else rs != 0)

    args = (gate, gate if up is None else up)
    if row_scale is not None:
        args += (row_scale.astype(jnp.float32),)
    return _launch(body, r, _outs(r, k), "swiglu_quantize")(*args)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _route_scales_kernel(logits, valid, token_scale, *, dtype):
    """logits [R, E] f32 (the router's dot before its rounding to ``dtype``), valid [R]
    int32, token_scale [R] f32 -> :func:`reference_route_scales`' (expert [R], scales [2R]).
    A row's E logits are scalars: E compares and one sigmoid, no reductions."""
    r, e = logits.shape

    def body(row, l_ref, v_ref, s_ref, expert_ref, scales_ref):
        top = _top1([l_ref[row, i].astype(dtype).astype(jnp.float32) for i in range(e)])
        _store_route(expert_ref, scales_ref, row, r, *top, v_ref[row] != 0, s_ref[row], e,
                     dtype)

    outs = (jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((2 * r,), jnp.float32))
    return _launch(body, r, outs, "route_scales")(logits, valid, token_scale)


# ---- the API --------------------------------------------------------------------------

def _rows(x):
    """x [..., K] -> ([R, K], a function putting [R, ...] results back in x's lead shape)."""
    lead = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(*lead, *y.shape[1:])


def quantize(x, *, scale_ub: float | None = None, impl: str = "auto",
             config: RowsConfig = RowsConfig()) -> fp8.Quantized:
    """``fp8.Quantized.of(x)`` (rows [..., K]) in one launch where the kernel runs."""
    x2, back = _rows(x)
    if not _use_kernel(impl, *x2.shape, config):
        return reference_quantize(x, scale_ub)
    q, s = _quantize_kernel(x2, scale_ub=scale_ub, config=config)
    return fp8.Quantized(back(q), back(s), jnp.dtype(x.dtype))


def rms_norm_quantize(x, weight, eps: float, *, scale_ub: float | None = None,
                      impl: str = "auto", config: RowsConfig = RowsConfig()):
    """HF's RMSNorm of ``x`` [..., K] with ``weight`` [K], and its quantisation:
    (normed rows in x's dtype, :class:`fp8.Quantized`)."""
    x2, back = _rows(x)
    if not _use_kernel(impl, *x2.shape, config):
        return reference_rms_norm_quantize(x, weight, eps, scale_ub)
    h, q, s = _rms_norm_quantize_kernel(x2, weight.astype(x.dtype), eps=float(eps),
                                        scale_ub=scale_ub, config=config)
    return back(h), fp8.Quantized(back(q), back(s), jnp.dtype(x.dtype))


def add_rms_norm_quantize(x, delta, weight, eps: float, *, scale_ub: float | None = None,
                          router=None, valid=None, impl: str = "auto",
                          config: RowsConfig = RowsConfig()):
    """:func:`rms_norm_quantize` of ``x + delta`` (x [..., K]): (the sum, the normed rows,
    their :class:`fp8.Quantized`). ``delta`` is a residual stream's pending update, so its
    add and the norm after it take one launch: an array in x's dtype, or a tuple of terms
    (:func:`fp8.sum_terms`: arrays and FP8 products whose scales, the epilogues of the
    matmuls before, apply here), each taken in x's dtype.

    ``router`` [E, K] (x [R, K]): a top-1 MoE router's weight; a fourth result is then
    what a decode step's by-row experts take, :func:`reference_route_scales` of the normed
    rows with their quantisation's scales: (each row's expert [R], E where ``valid`` [R]
    is False; the row scales [2R]). That is the router's logits, its top-1 and the rows'
    scales in this launch, where :func:`route_scales` takes two more."""
    x2, back = _rows(x)
    if router is not None and x.ndim != 2:
        raise ValueError(f"add_rms_norm_quantize with a router takes rows [R, K], got {x.shape}")
    terms = tuple(dataclasses.replace(t, dtype=jnp.dtype(x.dtype))
                  if isinstance(t, fp8.Unscaled) else t.astype(x.dtype)
                  for t in (delta if isinstance(delta, tuple) else (delta,)))
    if not _use_kernel(impl, *x2.shape, config):
        total, h, q = reference_add_rms_norm_quantize(x, terms, weight, eps, scale_ub)
        if router is None:
            return total, h, q
        return total, h, q, reference_route_scales(h, router, q.scale, valid)
    arrays, kinds = _flat_terms(terms, x2.shape[0])
    routing = {}
    if router is not None:
        valid = jnp.ones(x2.shape[:1], jnp.int32) if valid is None else valid.astype(jnp.int32)
        routing = dict(router=router.astype(x.dtype), valid=valid)
    total, h, q, s, *route = _rms_norm_quantize_kernel(
        x2, weight.astype(x.dtype), *arrays, **routing, kinds=kinds, eps=float(eps),
        scale_ub=scale_ub, config=config)
    out = back(total), back(h), fp8.Quantized(back(q), back(s), jnp.dtype(x.dtype))
    return out if router is None else (*out, tuple(route))


def route_scales(h, router, token_scale, valid=None, *, impl: str = "auto",
                 config: RowsConfig = RowsConfig()):
    """:func:`reference_route_scales` of ``h`` [R, K] through ``router`` [E, K]: the
    router's logits in XLA (in f32, rounded to h's dtype in the kernel, as the bf16
    Linear's), then the top-1, the score and the rows' scales in one launch where the
    kernel runs (XLA's argmax and the two concatenates around it were three small kernels
    per decode layer). :func:`add_rms_norm_quantize` can do all of it in the norm's launch."""
    r = h.shape[0]
    if not _use_kernel(impl, r, WARPGROUP, config):
        return reference_route_scales(h, router, token_scale, valid)
    # [R, E] f32 as a product and a row sum: one XLA reduction kernel, where a dot of a
    # decode step's 16 x 16 outputs is a split-K GEMM and its reduction (two launches)
    f32 = jnp.float32
    logits = (h.astype(f32)[:, None, :] * router.astype(h.dtype).astype(f32)[None]).sum(-1)
    valid = jnp.ones((r,), jnp.int32) if valid is None else valid.astype(jnp.int32)
    return _route_scales_kernel(logits, valid, token_scale.astype(jnp.float32),
                                dtype=jnp.dtype(h.dtype))


def swiglu_quantize(gate, up=None, row_scale=None, *, scale_ub: float | None = None,
                    impl: str = "auto", config: RowsConfig = RowsConfig()) -> fp8.Quantized:
    """``silu(gate) * up`` for ``gate``, ``up`` [..., K] (or ``gate`` [..., 2K] holding
    gate then up, and ``up`` None), each first scaled by ``row_scale`` [...] if given,
    quantised: :class:`fp8.Quantized` of [..., K] rows in gate's dtype."""
    g2, back = _rows(gate)
    if not _use_kernel(impl, g2.shape[0], g2.shape[1] // (2 if up is None else 1), config):
        if up is None:
            gate, up = jnp.split(gate, 2, axis=-1)
        return reference_swiglu_quantize(gate, up, row_scale, scale_ub)
    u2 = None if up is None else up.reshape(g2.shape)
    rs = None if row_scale is None else row_scale.reshape(-1)
    q, s = _swiglu_quantize_kernel(g2, u2, rs, scale_ub=scale_ub, config=config)
    return fp8.Quantized(back(q), back(s), jnp.dtype(gate.dtype))
