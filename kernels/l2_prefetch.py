"""Warm L2 with a decode matmul's first weight tiles from the small kernel that runs before it.

A batch-1 decode step of full-size Scout (FP8 weights, one H200) alternates weight-streaming
matmuls with row kernels that move a few KiB: the norms, the SwiGLU, the activation
quantisation (:mod:`fp8_rows`). While a row kernel and the launch gaps around it run, some
4-10 us a time and ~30 us a layer, HBM is idle, and every matmul after one starts with an
empty TMA ring on cold weights (they run at 3.3-3.8 TB/s against the 4.3 TB/s a long copy
reaches; benchmarks/NOTES-fp8.md, session 24). Here the row kernel's grid takes extra CTAs
that only issue ``cp.async.bulk.prefetch.tensor.L2`` for the first K columns of the next
matmul's weights and exit, meant to fill L2 during the idle window. The swap-AB matmul's
CTAs all start at K step 0 of their tiles (at batch 1 its work items fit one wave), so the
first K columns of every weight row are what the matmul reads first, before the lines it
streams after them can evict the prefetched ones.

Measured on the H200 (session 36, ``benchmarks/l2_prefetch.py``): it loses. The row kernel
plus the matmul after it took 0.8-1.8 us more per site at 16 MiB and 1.7-3.0 us at 32 MiB:
the row kernel gets longer (its CTAs seem not to leave the prefetches behind) and the
matmul no faster. So ``Fp8Scheme.l2_prefetch`` stays None; the module stays as the measured option.

Which weights: a :class:`Target` names them (a tuple of parts, as the matmul's launch
takes them), and for routed experts the rows' experts (the matmul's ``row_groups``), of
which the first ``max_groups`` distinct ones in expert order get prefetched: the by-row
matmul visits hit experts in that order.

Prefetching changes no value anywhere. GPU interpret mode has no rule for the prefetch
instruction, so there the prefetch CTAs do all but issue it (the kernel's operands and
outputs are then checked with them in place); the CUDA lowering tests lower every call
that carries one, and the GPU tests check a prefetching kernel's outputs equal the plain
ones.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxattn.kernels import common

BOX_ROWS = 256  # a TMA box spans at most 256 elements per dimension
BOX_BYTES = 256  # of a row per box: 64 KiB boxes of 8-bit weights


@dataclasses.dataclass(frozen=True)
class L2Prefetch:
    """How a row kernel warms L2 for the matmul after it (static)."""

    # Bytes per call: about what HBM delivers in a row kernel's window (4-10 us at ~4.3
    # TB/s is 17-43 MB), and well inside the H200's 50 MB L2, so that the matmul's own
    # loads do not evict the lines before it reads them.
    max_bytes: int = 16 << 20
    ctas: int = 64  # CTAs issuing prefetches: each SM's TMA unit walks its boxes' lines
    max_groups: int = 1  # routed experts warmed per call: the first hit ones, in expert order

    def __post_init__(self):
        if self.max_bytes < BOX_BYTES or self.ctas < 1 or self.max_groups < 1:
            raise ValueError(f"{self}: max_bytes >= {BOX_BYTES}, ctas and max_groups >= 1")


class Target(NamedTuple):
    """Weights a matmul reads next: ``parts`` [N, K] or [G, N, K] each (a launch's parts,
    one K), and ``groups`` (int32 [R], each row's group; >= G: none) for [G, N, K] parts
    whose rows' groups pick the experts, or None for a weight read whole ([N, K], or
    [1, N, K]: a shared expert)."""

    parts: tuple
    groups: jax.Array | None = None


class Warm(NamedTuple):
    """What a row kernel takes as ``prefetch``: the targets, and the config (static) to warm
    them with."""

    targets: tuple  # of Target
    config: L2Prefetch


class _Span(NamedTuple):
    """Static: the boxes of one part, for one expert slot."""

    part: int  # the part's index in the kernel's prefetched arrays
    routed: int | None  # its routed target's index among Plan.routed; None: read whole
    slot: int  # the slot-th hit expert of that target (0 for a part read whole)
    rows: int  # box rows
    cols: int  # box columns (elements)
    n_boxes: int  # along N
    k_boxes: int  # along K: the first k_boxes * cols columns are warmed
    first: int  # the plan's box number of this span's box 0 (boxes are dealt in that order)

    def box(self, b, n: int):
        """Box ``b``'s first row and column (ints, or int32 scalars in a kernel) in a part of
        ``n`` rows: N-major. The last N box of a part whose N is not a multiple of the box
        rows starts at ``n - rows`` (an overlap, never past the end)."""
        n0 = b // self.k_boxes * self.rows
        return (min(n0, n - self.rows) if isinstance(n0, int) else jnp.minimum(n0, n - self.rows),
                b % self.k_boxes * self.cols)


class Plan(NamedTuple):
    """What a kernel takes to prefetch ``targets``: ``arrays`` (every part, then each routed
    target's groups as int32 [R]) as extra operands, and static ``spans`` and ``routed``
    (each routed target's group count G) for :func:`issue`."""

    arrays: tuple
    spans: tuple[_Span, ...]
    routed: tuple[int, ...]


def _cols(part) -> int | None:
    """A box's columns for ``part`` ([..., K]): 256 bytes' worth, or all of a shorter K; None
    where K's bytes are not a multiple of 16 (TMA's unit). Columns past the last whole box of
    a longer K are left cold (a few, at the far end of K)."""
    size = jnp.dtype(part.dtype).itemsize
    k = part.shape[-1]
    return None if k * size % 16 else min(k, BOX_BYTES // size)


def plan(targets, config: L2Prefetch) -> Plan:
    """The first columns of every row of every part of ``targets`` (a routed part's once for
    each of ``config.max_groups`` expert slots), the same column count for all, as many
    as ``config.max_bytes`` covers (at least one box column: 256 bytes a row)."""
    for t in targets:
        for p in t.parts:
            whole = p.ndim == 2 or (p.ndim == 3 and p.shape[0] == 1)
            if p.ndim not in (2, 3) or (t.groups is None and not whole) or _cols(p) is None:
                raise ValueError(f"prefetch of a {p.shape} {jnp.dtype(p.dtype)} weight: [N, K] "
                                 f"or [1, N, K] read whole, or [G, N, K] with groups; rows of "
                                 f"a multiple of 16 bytes")
    row_bytes = sum((1 if t.groups is None else config.max_groups) * p.shape[-2] * BOX_BYTES
                    for t in targets for p in t.parts)
    k_boxes = max(1, config.max_bytes // row_bytes)
    parts, spans, groups, routed, first = [], [], [], [], 0
    for t in targets:
        r = None
        if t.groups is not None:
            r = len(routed)
            routed.append(t.parts[0].shape[0])
            groups.append(t.groups.reshape(-1).astype(jnp.int32))
        for p in t.parts:
            (n, k), cols = p.shape[-2:], _cols(p)
            rows = min(BOX_ROWS, n)
            for slot in range(1 if r is None else config.max_groups):
                spans.append(_Span(len(parts), r, slot, rows, cols, common.cdiv(n, rows),
                                   min(k_boxes, k // cols), first))
                first += spans[-1].n_boxes * spans[-1].k_boxes
            parts.append(p)
    return Plan(tuple(parts + groups), tuple(spans), tuple(routed))


def first_box(s: _Span, cta, ctas: int):
    """Prefetch CTA ``cta``'s first box of span ``s`` (an int, or an int32 scalar in a
    kernel); it issues every ``ctas``-th box from there. The plan's boxes are dealt to the
    CTAs in turn across spans (plan box ``s.first + b`` to CTA ``(s.first + b) % ctas``), so
    short spans do not all land on the first CTAs."""
    return (cta + ctas - s.first % ctas) % ctas


def issue(cta, ctas: int, prefetch: Plan, refs) -> None:
    """Prefetch CTA ``cta`` (of ``ctas``) issues its boxes of the plan (:func:`first_box`).
    ``refs``: the kernel's GMEM refs of ``prefetch.arrays``. Lane semantics (one thread
    issues each prefetch)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_parts = len(prefetch.arrays) - len(prefetch.routed)
    parts, group_refs = refs[:n_parts], refs[n_parts:]
    hits = [common.hit_groups([g_ref[i] for i in range(g_ref.shape[0])], g)
            for g_ref, g in zip(group_refs, prefetch.routed)]
    for s in prefetch.spans:
        ref, live = parts[s.part], True
        if s.routed is not None:
            group, count = common.nth_hit(hits[s.routed], s.slot)
            ref, live = ref.at[group], s.slot < count
        elif len(ref.shape) == 3:
            ref = ref.at[0]
        n, boxes = ref.shape[0], s.n_boxes * s.k_boxes
        mine = first_box(s, cta, ctas)
        for i in range(common.cdiv(boxes, ctas)):
            b = mine + i * ctas
            n0, k0 = s.box(b, n)
            if not common.interpreting():  # (no interpret rule for it)
                plgpu.async_prefetch(ref.at[pl.ds(n0, s.rows), pl.ds(k0, s.cols)],
                                     predicate=(b < boxes) & live)
