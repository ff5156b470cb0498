"""One engine step as static-shape arrays: what the model's serving forward consumes.

The host knows, per running sequence, the new tokens of this step, how many
of its tokens are already cached, and the pages it owns. :func:`build_step`
packs that into a :class:`StepBatch` whose shapes depend only on the bucket
size ``num_tokens`` and the :class:`~jaxattn.planner.Bounds` — never on
the lengths themselves.

A model with chunked-local layers (``bounds.chunk_size``) keeps their KV in a pool
of its own (the hybrid cache, :mod:`jaxattn.serve.block_manager`): the batch then
carries a second page table and slot array for it, of the same static shapes. Its
entries before a sequence's live chunk name returned pages (``NULL_PAGE`` on the
host) and become ``null_page`` here: the planner never lets a kernel read them.
Without chunked layers those two fields are empty.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.planner import Bounds


class StepBatch(NamedTuple):
    token_ids: jax.Array  # int32 [T] packed new tokens (padding: 0)
    positions: jax.Array  # int32 [T] absolute position of each token (padding: 0)
    cu_q_lens: jax.Array  # int32 [S+1]
    kv_lens: jax.Array  # int32 [S] cached + new tokens
    num_seqs: jax.Array  # int32 []
    page_table: jax.Array  # int32 [S, pages_per_seq]
    slots: jax.Array  # int32 [T] cache slot page*page_size+offset (padding: out of range)
    logits_indices: jax.Array  # int32 [S] row of each sequence's last new token (padding: 0)
    chunked_page_table: jax.Array  # int32 [S, pages_per_seq] (chunked layers; [S, 0] if none)
    chunked_slots: jax.Array  # int32 [T] slots in the chunked pool ([0] if none)


@dataclasses.dataclass(frozen=True)
class SeqStep:
    """Host view of one sequence in a step."""

    token_ids: Sequence[int]  # the new tokens computed this step
    num_cached: int  # tokens of this sequence already in the KV cache
    pages: Sequence[int]  # pages owned, covering num_cached + len(token_ids) tokens
    # The chunked-layer table (NULL_PAGE before the live chunk); None: the same as ``pages``
    # (a test's shortcut) or, without chunked layers, unused.
    chunked_pages: Sequence[int] | None = None


def build_step(bounds: Bounds, num_tokens: int, seqs: Sequence[SeqStep], *,
               num_pages: int, num_chunked_pages: int | None = None,
               null_page: int = 0) -> StepBatch:
    """Pack ``seqs`` into arrays padded to (``num_tokens``, ``bounds.max_num_seqs``).

    ``num_pages`` / ``num_chunked_pages`` (default: ``num_pages``): the pools' sizes.
    ``null_page``: the chunked-pool page that returned entries point at (never read;
    a test points them at a poisoned page). Raises ValueError naming the bound a step
    would break.
    """
    hybrid = bounds.chunk_size is not None
    num_chunked_pages = num_pages if num_chunked_pages is None else num_chunked_pages
    s_max, pps, ps = bounds.max_num_seqs, bounds.pages_per_seq, bounds.page_size
    if len(seqs) > s_max:
        raise ValueError(f"{len(seqs)} sequences exceed max_num_seqs={s_max}")
    if num_tokens > bounds.max_num_batched_tokens:
        raise ValueError(f"num_tokens={num_tokens} exceeds max_num_batched_tokens="
                         f"{bounds.max_num_batched_tokens}")
    q_lens = np.array([len(s.token_ids) for s in seqs], np.int64)
    if q_lens.sum() > num_tokens:
        raise ValueError(f"{q_lens.sum()} new tokens do not fit the bucket of {num_tokens}")
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, num_pages * ps, np.int32)
    cu = np.zeros(s_max + 1, np.int32)
    kv_lens = np.zeros(s_max, np.int32)
    table = np.zeros((s_max, pps), np.int32)
    logits_indices = np.zeros(s_max, np.int32)
    ctable = np.zeros((s_max, pps if hybrid else 0), np.int32)
    cslots = np.full(num_tokens if hybrid else 0, num_chunked_pages * ps, np.int32)
    off = 0
    for i, s in enumerate(seqs):
        n, kv = len(s.token_ids), s.num_cached + len(s.token_ids)
        if n == 0:
            raise ValueError(f"sequence {i} has no new tokens")
        if kv > bounds.max_model_len:
            raise ValueError(f"sequence {i}: {kv} tokens exceed max_model_len={bounds.max_model_len}")
        if len(s.pages) * ps < kv or len(s.pages) > pps:
            raise ValueError(f"sequence {i}: {len(s.pages)} pages cannot hold {kv} tokens")
        pages = np.asarray(s.pages, np.int32)
        if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
            raise ValueError(f"sequence {i}: page ids outside [0, {num_pages})")
        pos = np.arange(s.num_cached, kv)
        token_ids[off:off + n] = s.token_ids
        positions[off:off + n] = pos
        slots[off:off + n] = pages[pos // ps] * ps + pos % ps
        table[i, :len(pages)] = pages
        if hybrid:
            cpages = np.asarray(pages if s.chunked_pages is None else s.chunked_pages, np.int32)
            window = s.num_cached // bounds.chunk_size * bounds.chunk_size // ps
            live = cpages[window:]
            if len(cpages) != len(pages) or (live.size and (
                    live.min() < 0 or live.max() >= num_chunked_pages)):
                raise ValueError(f"sequence {i}: its chunked pages from the live chunk (page "
                                 f"{window}) must be ids in [0, {num_chunked_pages})")
            ctable[i, :len(cpages)] = np.where(cpages < 0, null_page, cpages)
            cslots[off:off + n] = cpages[pos // ps] * ps + pos % ps
        kv_lens[i] = kv
        off += n
        cu[i + 1] = off
        logits_indices[i] = off - 1
    cu[len(seqs) + 1:] = off
    return StepBatch(token_ids, positions, cu, kv_lens, np.int32(len(seqs)), table, slots,
                     logits_indices, ctable, cslots)


# The step's arrays travel to the device as one int32 vector: one host-to-device copy
# per step instead of ten (each copy costs ~20 us of host time; a decode step is ~2 ms).
# Every field starts at a multiple of 64 values (256 bytes): XLA passes a slice of the
# vector to a kernel as a view into it, and the Mosaic GPU kernels require 256-byte
# aligned operands.
_ALIGN = 64


def _field_shapes(num_tokens: int, bounds: Bounds) -> StepBatch:
    t, s = num_tokens, bounds.max_num_seqs
    hybrid = bounds.chunk_size is not None
    return StepBatch(token_ids=(t,), positions=(t,), cu_q_lens=(s + 1,), kv_lens=(s,),
                     num_seqs=(), page_table=(s, bounds.pages_per_seq), slots=(t,),
                     logits_indices=(s,),
                     chunked_page_table=(s, bounds.pages_per_seq if hybrid else 0),
                     chunked_slots=(t if hybrid else 0,))


def packed_size(num_tokens: int, bounds: Bounds) -> int:
    """Length of :func:`pack`'s vector for a step of ``num_tokens`` tokens."""
    return sum(_padded(int(np.prod(shape))) for shape in _field_shapes(num_tokens, bounds))


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def pack(batch: StepBatch):
    """int32 vector of the fields of ``batch`` end to end, each padded to 64 values.

    Host (numpy) fields give a numpy vector; if any field is a jax.Array the
    vector is built on the device (no round trip through the host)."""
    xp = jnp if any(isinstance(x, jax.Array) for x in batch) else np
    parts = []
    for x in batch:
        x = xp.ravel(xp.asarray(x)).astype(np.int32)
        parts += [x, xp.zeros(_padded(x.shape[0]) - x.shape[0], np.int32)]
    return xp.concatenate(parts)


def unpack(flat, bounds: Bounds, num_tokens: int) -> StepBatch:
    """Inverse of :func:`pack` for a batch of ``num_tokens`` (static slices: works in jit)."""
    shapes = _field_shapes(num_tokens, bounds)
    sizes = [int(np.prod(shape)) for shape in shapes]
    if flat.shape != (sum(map(_padded, sizes)),):
        raise ValueError(f"a packed step of shape {flat.shape} is not one of {num_tokens} "
                         f"tokens under {bounds}")
    fields, off = [], 0
    for shape, n in zip(shapes, sizes):
        fields.append(flat[off:off + n].reshape(shape))
        off += _padded(n)
    return StepBatch(*fields)
