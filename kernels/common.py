"""What the Mosaic GPU kernels share: the shapes they take, math constants, the device.

The attention kernels (prefill, decode) run one wgmma tile per KV head with
bf16/f16 operands, so they take the head dims and dtypes below; the grouped
matmul takes the same dtypes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn import kv_quant
from jaxattn.planner import cdiv  # noqa: F401  (one ceiling division for the whole package)

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# KV cache dtypes the attention kernels read besides q's own: the FP8 cache (with scales).
FP8_KV = kv_quant.FP8
FP8_PAGE_MULTIPLE = kv_quant.FP8_PAGE_MULTIPLE
WGMMA_M = 64  # rows of one wgmma-layout register tile

# Softmax runs in base 2 (exp2 is one MUFU instruction): scores are scaled by
# log2(e), and the log-sum-exp is turned back into natural log with ln(2).
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Hopper's dynamic shared memory per block (what Mosaic GPU checks against).
MAX_SMEM = 227 * 1024
# Mosaic GPU starts every scratch buffer on a 1 KiB boundary; an mbarrier is 8 bytes.
SMEM_ALIGNMENT = 1024
MBARRIER_BYTES = 8
# SM count assumed where no GPU is attached (lowering for CUDA on a CPU host):
# an H100 / H200 SXM.
_DEFAULT_SMS = 132

# Programmatic dependent launch (PDL, sm_90). With it on, every kernel first waits for the
# kernels before it in the stream (griddepcontrol.wait: their writes are visible after it) and
# then lets the next one launch (launch_dependents), so each launch's start (CTA placement,
# the kernel's setup) overlaps the end of the one before instead of following the last of
# its CTAs. Nothing another kernel writes is read, and nothing is written, before the wait
# (the decode matmuls copy weights there, which no kernel writes; grouped_matmul's
# groups_settled reads what was written two launches back), so the order of memory effects is
# the stream's. On by default since session 46: 12 of Scout's layers (FP8, batch 1 x 8k, H100)
# decoded in 4.04 ms a step against 5.38 without, the same 64 tokens and logprobs bit for bit
# (benchmarks/NOTES-fp8.md). Read when a kernel is traced; JAXATTN_DEPENDENT_LAUNCH=0 turns it
# off for a process.
DEPENDENT_LAUNCH = os.environ.get("JAXATTN_DEPENDENT_LAUNCH", "1") == "1"


def supports(head_dim: int, dtype) -> bool:
    return head_dim in HEAD_DIMS and jnp.dtype(dtype) in DTYPES


def check_supported(kernel: str, head_dim: int, dtype) -> None:
    """ValueError naming ``kernel`` unless it takes this head_dim and dtype."""
    if jnp.dtype(dtype) not in DTYPES:
        raise ValueError(f"{kernel} kernel supports bfloat16/float16, got {jnp.dtype(dtype)}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{kernel} kernel supports head_dim {HEAD_DIMS}, got {head_dim}")


def check_kv_dtype(kernel: str, dtype, kv_dtype, has_scales: bool | None = None) -> None:
    """ValueError unless the kernel reads a KV cache of ``kv_dtype`` under q of ``dtype``:
    the same dtype, or FP8 with scales (``has_scales``: whether they came; None: not known)."""
    if kv_dtype is None or jnp.dtype(kv_dtype) == jnp.dtype(dtype):
        if has_scales:
            raise ValueError(f"{kernel} kernel: scales given for a {jnp.dtype(dtype)} cache")
        return
    if jnp.dtype(kv_dtype) != FP8_KV:
        raise ValueError(f"{kernel} kernel reads a {jnp.dtype(dtype)} or float8_e4m3fn KV "
                         f"cache under {jnp.dtype(dtype)} queries, got {jnp.dtype(kv_dtype)}")
    if has_scales is False:
        raise ValueError(f"{kernel} kernel: a float8_e4m3fn cache needs k_scale and v_scale")


def tiled_smem(shape, dtype):
    """SMEM operand tile for TMA/wgmma: (8, 128-byte) tiles, swizzled (narrower rows: less)."""
    row_bytes = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, row_bytes // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(row_bytes)))


# Register layouts an FP8 tile can be dequantised in, by the values a thread holds in one
# vector: its shared-memory loads (fp8) and stores (16-bit) are that many values wide. Each
# vector lies within one row, so a row's scale applies to it whole.
DEQUANT_LAYOUTS = {2: plgpu.Layout.WGMMA, 4: plgpu.Layout.WGMMA_UPCAST_2X,
                   8: plgpu.Layout.WGMMA_UPCAST_4X}


def dequantize_tile(src8, scale, dst, vector: int = 2):
    """``dst[r, :] = src8[r, :] * scale[r]``: an FP8 K/V tile (SMEM) into a wgmma operand
    (``scale`` None: the values converted only, for keys whose one scale the caller folds
    into the softmax's).

    src8 [rows, D] float8_e4m3fn and dst [rows, D] (bf16/f16) are SMEM tiles, scale
    [rows] f32 in SMEM. rows a multiple of 64. Runs on one warpgroup, 64 rows at a time (a
    register tile of 64 values per thread at D=128, in vectors of ``vector`` values:
    :data:`DEQUANT_LAYOUTS`; 2 is the wgmma layout, whose fp8 loads are 2 bytes wide), and
    commits the stores so the async proxy (wgmma) sees them. Returns ``dst``.

    An f16 ``dst`` is computed in f16: ``f16(x8) * f16(s)``, a conversion per pair of values
    (``cvt.rn.f16x2.e4m3x2``) and a multiply per pair, where bf16 takes e4m3 -> f16 -> f32,
    an f32 multiply and the bf16 pack (~3 instructions a value). Exact up to f16's rounding
    of the scale and the product, since the cache keeps its scales in f16's normal range
    and the products below its largest value (:mod:`jaxattn.kv_quant`;
    :func:`jaxattn.kv_quant.dequantize_f16` is this form's reference).
    """
    rows = src8.shape[0]
    f16 = jnp.dtype(dst.dtype) == jnp.float16
    layout = DEQUANT_LAYOUTS[vector]
    for r in range(0, rows, WGMMA_M):
        part = pl.ds(r, WGMMA_M)
        x8 = plgpu.load(src8.at[part], layout=layout)
        if scale is None:  # exact: e4m3 fits f16 and bf16
            # (Mosaic converts e4m3 to f16 only; to bf16 through f32)
            x = x8.astype(jnp.float16) if f16 else x8.astype(jnp.float32)
            dst.at[part][...] = x.astype(dst.dtype)
            continue
        s = plgpu.load(scale.at[part], layout=layout.reduce(1))
        if f16:
            x = x8.astype(jnp.float16)
            dst.at[part][...] = x * lax.broadcast_in_dim(s.astype(jnp.float16), x.shape, [0])
        else:
            x = x8.astype(jnp.float32)
            dst.at[part][...] = (x * lax.broadcast_in_dim(s, x.shape, [0])).astype(dst.dtype)
    plgpu.commit_smem()
    return dst


def dequantize_to_ring(src8, scale, full, ring, ring_free, ring_full, step, depth,
                       vector: int = 2):
    """A dequantising warpgroup's step ``step``: once the fp8 tile ``src8`` (with its row
    scales ``scale``, or None: :func:`dequantize_tile`) has landed (``full``, its slot's
    barrier) and slot ``step % depth`` of ``ring`` is free (its readers of step ``step -
    depth`` have arrived on ``ring_free``), dequantise into that slot (``vector``:
    :func:`dequantize_tile`'s) and signal ``ring_full``."""
    dslot = lax.rem(step, depth)
    plgpu.barrier_wait(full)

    @pl.when(step >= depth)
    def _():
        plgpu.barrier_wait(ring_free.at[dslot])

    dequantize_tile(src8, scale, ring.at[dslot], vector)
    plgpu.barrier_arrive(ring_full.at[dslot])


def quantize_rows(src, dst):
    """Each row of ``src`` (a [64, D] SMEM tile, bf16/f16) to e4m3 in ``dst`` (an fp8 wgmma
    operand tile), scaled by its own max as :func:`jaxattn.kv_quant.quantize` scales K/V
    rows (the same arithmetic: multiplications by reciprocals), but without the cache's
    scale range (these rows never meet f16 arithmetic): the two agree for rows whose largest
    value lies in [0.027, 65408]. Returns the row scales [64] f32 (a wgmma row layout); a
    row of zeros gets scale 1. The caller commits the stores (``plgpu.commit_smem``) before
    a wgmma reads ``dst``.

    Loaded in the wgmma layout. Reading ``src`` in 16-byte vectors instead (``WGMMA_UPCAST_4X``:
    2-way bank conflicts on the untiled tile instead of 8-way) gave the same numbers and no
    measurable time on the H200 (session 30, results/fp8-kv-2026-12-04-s30*.md), so it went."""
    x = plgpu.load(src, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = jnp.where(amax > 0, amax * (1.0 / kv_quant.FP8_MAX), 1.0)
    dst[...] = (x * lax.broadcast_in_dim(1.0 / scale, x.shape, [0])).astype(dst.dtype)
    return scale


def times_rows(x, scale):
    """``x`` [64] or [64, N] (wgmma layout) times ``scale``: a constant, or one per row
    ([64]; for a row vector ``x`` too, elementwise)."""
    if isinstance(scale, float) or x.ndim == 1:
        return x * scale
    return x * lax.broadcast_in_dim(scale, x.shape, [0])


def column_scales(scale, shape):
    """``scale`` [N] f32 (SMEM) broadcast over the rows of a wgmma-layout [M, N] tile: each
    key's K scale on S's column, for the FP8 QK product ``S = Q8 K8^T`` (prefill)."""
    s = plgpu.load(scale, layout=plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(s, shape, [1])


def check_pages(kernel: str, page_size: int, block_kv: int, pages_per_seq: int,
                fp8: bool = False) -> None:
    """ValueError unless ``kernel`` can fill its KV tiles of ``block_kv`` keys from these pages.

    A tile is ``block_kv // page_size`` whole pages (small pages: each lands in whole 8-row
    SMEM tiles), or one TMA copy of a slice of one page: pages that are a multiple of the
    tile, or one page per sequence of any length (the contiguous API: the last tile reads
    past the page's end, which TMA fills with zeros, and those keys are masked).
    ``fp8``: the cache's scale rows (f32) come by TMA too, one copy per page, and a TMA's
    shared-memory destination must be 128-byte aligned: small pages must be a multiple of
    :data:`FP8_PAGE_MULTIPLE` tokens (GPU interpret mode does not check alignment; the
    H200 fails with CUDA_ERROR_MISALIGNED_ADDRESS).
    """
    if pages_per_seq == 1 or page_size % block_kv == 0:
        return
    if block_kv % page_size or page_size % 8:
        raise ValueError(f"{kernel} kernel: page_size={page_size} must be a multiple of 8 "
                         f"dividing block_kv={block_kv}, a multiple of block_kv, or hold a "
                         f"whole sequence")
    if fp8 and page_size % FP8_PAGE_MULTIPLE:
        raise ValueError(f"{kernel} kernel: an FP8 KV cache needs page_size a multiple of "
                         f"{FP8_PAGE_MULTIPLE} (each page's scale row is one TMA copy into a "
                         f"128-byte aligned slot), got {page_size}")


def smem_bytes(scratch) -> int:
    """Dynamic shared memory Mosaic GPU allocates for a kernel's ``scratch_types``.

    Every buffer is rounded up to :data:`SMEM_ALIGNMENT`, then the mbarriers
    follow (``None`` entries allocate nothing). Buffers a kernel body scopes
    itself (``pl.run_scoped``) are not in the list and not counted.
    """
    buffers, barriers = 0, 0
    for s in scratch:
        if s is None:
            continue
        if isinstance(s, plgpu.Barrier):
            barriers += math.prod(s.num_barriers)  # a shape; () is one barrier
        else:
            nbytes = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
            buffers += cdiv(nbytes, SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    return buffers + MBARRIER_BYTES * barriers


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (sm_90), where the kernels run natively."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def num_sms() -> int:
    """SMs of the default device: one persistent CTA each."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or _DEFAULT_SMS)


def interpreting() -> bool:
    """Whether Pallas kernels traced now run in GPU interpret mode (force_gpu_interpret_mode)."""
    from jax._src import config

    return config.pallas_tpu_interpret_mode_context_manager.value is not None


def dependent_launch(interpret=None) -> None:
    """The first thing in a kernel body: with :data:`DEPENDENT_LAUNCH`, wait for the kernels
    before it, then let the next launch. GPU interpret mode (``interpret``, or
    :func:`interpreting`) runs kernels one at a time and has no rule for these
    instructions, so there it does nothing."""
    if not DEPENDENT_LAUNCH or interpret or interpreting():
        return
    plgpu.griddepcontrol_wait()
    plgpu.griddepcontrol_launch_dependents()


# A parent's ticket (the main decode kernel's folded combine): one thread of the warpgroup,
# the one that issued its TMA stores and has waited for them to complete, makes them visible
# to the generic proxy, adds 1 to the counter with acquire-release order at GPU scope (so the
# piece that finishes last sees every other piece's rows), puts 0 back where it was last (no
# other piece touches the counter again in this call), and fences the async proxy again so
# the rows it then copies in with TMA are the ones the counter published.
_TICKET_PTX = """{
    .reg .pred last;
    .reg .u32 next;
    fence.proxy.async.global;
    atom.acq_rel.gpu.global.add.u32 $0, [$1], 1;
    add.u32 next, $0, 1;
    setp.eq.u32 last, next, $2;
    @last st.relaxed.gpu.global.u32 [$1], 0;
    fence.proxy.async.global;
}"""


def ticket(counter, count, flag):
    """Fetch-and-add on a global int32 counter by one thread of the warpgroup: returns (to
    every thread) how many pieces had finished before this one; where that is ``count - 1``
    the counter is reset to 0. ``counter``: a one-element view of a GMEM int32 array;
    ``flag``: a one-element int32 SMEM buffer that carries the value to the warpgroup. GPU
    only (GPU interpret mode has no atomics)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT, plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((), jnp.int32,
                                                          layout=plgpu.Layout.WG_SPLAT))
    def take(_, counter_ref, n, flag_ref):
        i32 = ir.IntegerType.get_signless(32)
        zero = arith.constant(ir.IndexType.get(), 0)
        mgpu_utils.warpgroup_barrier()  # every thread's wait for the stores is behind us
        with mgpu_utils.single_thread(mgpu_utils.ThreadSubset.WARPGROUP):
            old = mgpu_utils.inline_ptx(_TICKET_PTX, mgpu_utils.memref_ptr(counter_ref),
                                        n.registers[()], result_types=i32,
                                        has_side_effects=True)
            memref.store(old, flag_ref, [zero])
        mgpu_utils.warpgroup_barrier()
        return mgpu.FragmentedArray.splat(memref.load(flag_ref, [zero]), (), is_signed=True)

    return take(counter, count, flag)


def fence_async_global():
    """``fence.proxy.async.global`` on every thread of the warpgroup: global memory its
    generic-proxy view has acquired is what its next TMA copies read."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def fence(_):
        mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

    fence()


# On-device tracing (Mosaic GPU's profiler): (directory, events per warpgroup) while a
# kernel_trace() block is open, else None. Read when a kernel is traced.
_TRACE: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "jaxattn_kernel_trace", default=None)


@contextlib.contextmanager
def kernel_trace(directory: str, events: int = 64):
    """Kernels traced inside this block record their ``jax.named_scope`` regions on the
    device, per warpgroup, and write a Chrome trace JSON into ``directory`` after each call
    (Mosaic GPU's on-device profiler; ``events`` begin/end pairs per warpgroup, later ones
    dropped; their buffer takes shared memory, 16 bytes a pair per warpgroup, which a kernel
    near the budget may not have). The timestamps are SM clock cycles from each warpgroup's
    first region (:mod:`benchmarks.kernel_trace` summarises them). Off the GPU it changes
    nothing.

    JAX's caches are cleared on the way in and out: a function jitted before (the kernels'
    own jitted builders among them) would otherwise keep its untraced lowering inside, or
    its traced one after."""
    jax.clear_caches()
    token = _TRACE.set((directory, events))
    try:
        yield
    finally:
        _TRACE.reset(token)
        jax.clear_caches()


def compiler_params(**params) -> plgpu.CompilerParams:
    """A kernel's ``plgpu.CompilerParams(**params)``, with the profiler's inside a
    :func:`kernel_trace` block."""
    trace = _TRACE.get()
    if trace is not None:
        params.update(profile_dir=trace[0], profile_space=trace[1], profile_bounds_check=True)
    return plgpu.CompilerParams(**params)
