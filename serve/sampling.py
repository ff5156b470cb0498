"""Token sampling on the device: one jitted function over a static-shape batch of rows.

Every row (a sequence of the step, padded to ``max_num_seqs``) carries its
own temperature, top-k, top-p and PRNG key, so greedy and sampled requests
share one call and one compile. The key of a row is derived from (request
seed, output index n, token position in the output): a sequence's tokens do
not depend on what else is in the batch, and a sequence preempted and
recomputed draws the same tokens again.

Logit processing (penalties, ``logit_bias``, ``min_tokens``, ``min_p``, grammar masks)
runs only when some row asks for it, from a :class:`Processing` of fixed-shape arrays:
per-row penalties [S]; a bias table [S, BIAS_WIDTH] of (token id, value) pairs (the
request's ``logit_bias`` and, while ``min_tokens`` holds, -inf on its stop ids); a packed
allowed-token bitmask [S, ceil(V / 32)] (all ones for rows without a grammar); and the
row of each sequence in the :class:`PenaltyState` (padding: its spare last row).

Penalties need each sequence's token counts, including the token the step before drew
and the host has not seen yet (async scheduling). They live on the device: a
``[max_num_seqs + 1, V]`` int32 table, one row per running penalized sequence, whose
low 30 bits count the token in the output and bit 30 marks it in the prompt. The
sampler adds each draw to its row itself, so the next step sees it without a round trip;
the host only seeds a row when a sequence takes it (:func:`seed_rows`: the prompt, the
output so far and the token still in flight), in fixed-size chunks.

The threshold search that top-k / top-p need (:func:`filter_mask`) runs only
when some row asks for them. Which path a batch takes (:data:`MODES`) and whether it wants
top logprobs are decided on the host, from the rows, and compiled as separate
variants (all at warm-up): a ``lax.cond`` on a device value would make XLA copy
the predicate to the host and wait for the model step, so the engine could not
enqueue the next step while this one runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.serve.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_MIN_TOKENS_STOP_IDS


# (temperature, top_k, top_p, seed, index, position) of a row that only needs its argmax: a
# sequence that does not sample this step, or padding.
GREEDY_ROW = (0.0, 0, 1.0, 0, 0, 0)


class SamplingBatch(NamedTuple):
    """Per-row parameters, each [S]; padding rows are greedy and ignored."""

    temperature: np.ndarray  # f32, 0: greedy
    top_k: np.ndarray  # int32, 0: off
    top_p: np.ndarray  # f32, 1: off
    seed_lo: np.ndarray  # uint32: a 64-bit seed in two halves (x64 is off in JAX)
    seed_hi: np.ndarray  # uint32
    index: np.ndarray  # int32: which of the request's n outputs
    position: np.ndarray  # int32: index of the token being drawn within the output

    @staticmethod
    def build(rows: list[tuple[float, int, float, int, int, int]], size: int) -> "SamplingBatch":
        """rows: (temperature, top_k, top_p, seed, index, position) per sequence, padded to ``size``."""
        t = np.zeros(size, np.float32)
        k = np.zeros(size, np.int32)
        p = np.ones(size, np.float32)
        lo = np.zeros(size, np.uint32)
        hi = np.zeros(size, np.uint32)
        idx = np.zeros(size, np.int32)
        pos = np.zeros(size, np.int32)
        for i, (temp, top_k, top_p, seed, index, position) in enumerate(rows):
            t[i], k[i], p[i], idx[i], pos[i] = temp, top_k, top_p, index, position
            lo[i], hi[i] = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        return SamplingBatch(t, k, p, lo, hi, idx, pos)


# Width of the per-row bias table: the request's logit_bias plus min_tokens' stop ids.
BIAS_WIDTH = MAX_LOGIT_BIAS + MAX_MIN_TOKENS_STOP_IDS
_PROMPT_BIT = 1 << 30
_COUNT_MASK = _PROMPT_BIT - 1
# Token entries one seed_rows call writes (a longer seed takes several calls).
SEED_CHUNK = 4096


class Processing(NamedTuple):
    """Per-row logit processing, each [S, ...]; neutral values leave a row untouched."""

    presence: np.ndarray  # f32 [S]
    frequency: np.ndarray  # f32 [S]
    repetition: np.ndarray  # f32 [S], 1: off
    min_p: np.ndarray  # f32 [S], 0: off
    slot: np.ndarray  # int32 [S]: row in the PenaltyState (its last row: none, not counted)
    bias_ids: np.ndarray  # int32 [S, BIAS_WIDTH] (padding: id 0, value 0)
    bias_values: np.ndarray  # f32 [S, BIAS_WIDTH]
    mask: np.ndarray  # int32 [S, ceil(V/32)]: allowed-token bits (-1: all)

    @staticmethod
    def neutral(size: int, vocab_size: int, num_slots: int) -> "Processing":
        """Arrays for ``size`` rows that change nothing (fill rows in place)."""
        words = (vocab_size + 31) // 32
        return Processing(np.zeros(size, np.float32), np.zeros(size, np.float32),
                          np.ones(size, np.float32), np.zeros(size, np.float32),
                          np.full(size, num_slots, np.int32),
                          np.zeros((size, BIAS_WIDTH), np.int32),
                          np.zeros((size, BIAS_WIDTH), np.float32),
                          np.full((size, words), -1, np.int32))


def new_penalty_state(num_slots: int, vocab_size: int, sharding=None) -> jax.Array:
    """The penalty table: ``num_slots`` rows plus a spare one that padding rows point at."""
    return jnp.zeros((num_slots + 1, vocab_size), jnp.int32, device=sharding)


@functools.partial(jax.jit, donate_argnums=(0,))
def seed_rows(state, reset, slots, ids, values, pending_slots, pending_rows, prev_tokens):
    """Zero the rows ``reset`` [S], add ``values`` at (``slots``, ``ids``) [SEED_CHUNK] and 1
    at (``pending_slots[i]``, ``prev_tokens[pending_rows[i]]``) [S]: a token drawn by the
    step in flight. Padding entries point at the spare row with value 0 (it stays zero)."""
    spare = state.shape[0] - 1
    state = state.at[reset].set(0)
    state = state.at[slots, ids].add(values)
    tok = prev_tokens[pending_rows]
    return state.at[pending_slots, tok].add((pending_slots < spare).astype(jnp.int32))


def process_logits(logits, proc: Processing, rows_state):
    """``logits`` [S, V] f32 after bias, penalties and the grammar mask (before temperature).

    ``rows_state``: each row's PenaltyState row [S, V] (zeros for a row without one)."""
    s, v = logits.shape
    x = logits.at[jnp.arange(s)[:, None], proc.bias_ids].add(proc.bias_values)
    counts = rows_state & _COUNT_MASK
    seen = (counts > 0) | ((rows_state & _PROMPT_BIT) != 0)
    rep = proc.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - proc.frequency[:, None] * counts.astype(jnp.float32)
    x = x - proc.presence[:, None] * (counts > 0).astype(jnp.float32)
    bit = jnp.arange(v, dtype=jnp.int32)
    allowed = (jnp.take(proc.mask, bit // 32, axis=1) >> (bit % 32)[None, :]) & 1
    return jnp.where(allowed != 0, x, -jnp.inf)


def apply_min_p(x, min_p):
    """Keep tokens whose probability under ``x`` [S, V] (temperature applied) is at least
    ``min_p`` [S] times the most likely one's."""
    floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(x >= floor, x, -jnp.inf)


def filter_mask(x: jax.Array, top_k: jax.Array | None, top_p: jax.Array,
                search=None) -> jax.Array:
    """keep [S, V] bool: the tokens of ``x`` [S, V] (temperature applied) that top-k (``top_k``
    [S] int32, 0: off; None: off for every row, and its search skipped) and then top-p
    (``top_p`` [S] f32, 1: off) leave a row to draw from: its most likely tokens, as few as
    make up ``top_p`` of the mass the top-k ones have.

    No sort: each limit is a threshold on the row's values, found by a search over their
    32-bit order keys (:func:`_largest_key`), so a token is kept iff its value is at least
    the last kept one's (ties with it are all kept). It replaced a sort of [S, V] (value,
    id) pairs and a scatter back to vocabulary order; XLA's GPU sorts are many kernels
    (its top-k over Scout's vocabulary was ~28, 0.45 ms of an H100 decode step). ``search``:
    another :func:`_largest_key` (benchmarks.sampling times a candidate)."""
    search = search or _largest_key
    keys = _order_keys(x)
    v = x.shape[-1]
    if top_k is None:
        t_k = jnp.zeros(x.shape[:-1], jnp.uint32)
    else:
        k_on = (top_k > 0) & (top_k < v)
        count = search(keys, jnp.ones_like(x), jnp.where(k_on, top_k, 0).astype(jnp.float32))
        t_k = jnp.where(k_on, count, 0)
    w = jnp.where(keys >= t_k[:, None], jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    mass = search(keys, w, top_p * jnp.sum(w, axis=-1))
    t_p = jnp.where(top_p < 1, mass, 0)
    return keys >= jnp.maximum(t_k, t_p)[:, None]


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of ``x``'s f32 values (-inf first; -0 counts as +0)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


# Thresholds :func:`_largest_key` tries at once: 4 bits of the key a round, 8 rounds.
_SEARCH_BITS = 4


def _largest_key(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest uint32 ``t`` with ``sum(weights[keys >= t]) >= target``: keys [S, V]
    uint32, weights [S, V] f32 >= 0, target [S] f32 (at most the row's sum; else 0 comes
    back). That ``t`` is some entry's key. A Python loop of fixed rounds, not a while loop:
    the sampler holds no control flow whose predicate XLA might read on the host, where the
    engine must not wait on a step it enqueued (tests/serve/test_paged_step_lowering.py
    checks for none). A round's sums over subsets of the same entries in the same order
    shrink as the threshold grows (rounding is monotone), so counting the thresholds that
    hold finds the largest."""
    ways = 1 << _SEARCH_BITS
    steps = jnp.arange(1, ways, dtype=jnp.uint32)  # step 0 (the base) holds already
    base = jnp.zeros(keys.shape[:-1], jnp.uint32)
    for shift in range(32 - _SEARCH_BITS, -1, -_SEARCH_BITS):
        tries = base[:, None] | (steps << shift)  # [S, ways - 1]
        mass = jnp.sum(jnp.where(keys[:, None, :] >= tries[:, :, None], weights[:, None, :], 0.0),
                       axis=-1)
        held = jnp.sum(mass >= target[:, None], axis=-1).astype(jnp.uint32)
        base = base | (held << shift)
    return base


class Sampled(NamedTuple):
    token_ids: jax.Array  # int32 [S]
    logprobs: jax.Array  # f32 [S]: log-probability of the drawn token under the model
    top_ids: jax.Array  # int32 [S, MAX_LOGPROBS] (zeros unless a row asked for logprobs)
    top_logprobs: jax.Array  # f32 [S, MAX_LOGPROBS]


def _row_key(lo, hi, index, position):
    key = jax.random.key(lo)
    for x in (hi, index, position):
        key = jax.random.fold_in(key, x)
    return key


# How a batch draws: every row greedy; some row sampled, none with top-k / top-p; some row
# with top-p, none with top-k (one threshold search over the vocabulary: Scout's
# generation_config sends every default request here); or some row with top-k (two
# searches, :func:`filter_mask`).
MODES = ("greedy", "random", "top_p", "filtered")


def mode_of(params: SamplingBatch) -> str:
    """The cheapest of :data:`MODES` that serves every row of ``params`` (host arrays)."""
    sampled = np.asarray(params.temperature) != 0
    if not sampled.any():
        return "greedy"
    if (sampled & (np.asarray(params.top_k) > 0)).any():
        return "filtered"
    if (sampled & (np.asarray(params.top_p) < 1)).any():
        return "top_p"
    return "random"


def sampler_rows(live: int, size: int) -> int:
    """Rows the sampler works on for ``live`` sequences of a step padded to ``size`` rows:
    the next power of 8, at most ``size``. Its work is per row over the whole vocabulary
    (a top-p mask over 64 rows took 2-3 ms on an H100, over one 0.07-0.1 ms:
    ``results/sampling-2026-12-06-s47-h100.json``), so a batch of one must not pay for the
    63 padding rows of the default ``max_num_seqs``; powers of 8 keep the compiled
    variants few (1, 8 and 64 rows by default)."""
    rows = 1
    while rows < live:
        rows *= 8
    return min(rows, size)


def sampler_row_sizes(size: int) -> list[int]:
    """Every :func:`sampler_rows` of a step of ``size`` rows (the variants to compile)."""
    return sorted({sampler_rows(n, size) for n in range(1, size + 1)})


def draw(logits, params: SamplingBatch, want_logprobs: bool, live: int) -> Sampled:
    """Sample one token per row of the first ``live`` (asynchronously: the result stays on
    the device); the padding rows' draws are zeros."""
    return sample(logits, params, mode=mode_of(params), want_logprobs=bool(want_logprobs),
                  rows=sampler_rows(live, logits.shape[0]))


def draw_processed(logits, params: SamplingBatch, proc: Processing, state,
                   want_logprobs: bool, live: int) -> tuple[Sampled, jax.Array]:
    """:func:`draw` after :func:`process_logits`; returns the draws and the penalty table
    with them counted (``state`` is donated)."""
    return sample_processed(logits, params, proc, state, mode=mode_of(params),
                            want_logprobs=bool(want_logprobs),
                            rows=sampler_rows(live, logits.shape[0]))


@functools.partial(jax.jit, static_argnames=("mode", "want_logprobs", "rows"))
def sample(logits, params: SamplingBatch, *, mode: str, want_logprobs: bool,
           rows: int | None = None) -> Sampled:
    """logits [S, V] f32 -> one token per row; ``mode`` one of :data:`MODES` (see :func:`draw`);
    only the first ``rows`` are drawn (None: all), the rest zeros."""
    x, params = _first(rows, logits, params)
    return _pad_rows(_sample(x, x, params, mode, want_logprobs), logits.shape[0])


@functools.partial(jax.jit, static_argnames=("mode", "want_logprobs", "rows"),
                   donate_argnums=(3,))
def sample_processed(logits, params: SamplingBatch, proc: Processing, state, *, mode: str,
                     want_logprobs: bool, rows: int | None = None) -> tuple[Sampled, jax.Array]:
    spare = state.shape[0] - 1
    size = logits.shape[0]
    logits, params, proc = _first(rows, logits, params, proc)
    x = process_logits(logits, proc, state[proc.slot])
    out = _sample(logits, x, params, mode, want_logprobs, min_p=proc.min_p)
    state = state.at[proc.slot, out.token_ids].add((proc.slot < spare).astype(jnp.int32))
    return _pad_rows(out, size), state


def _first(rows: int | None, *trees):
    return jax.tree.map(lambda a: a[:rows], trees)


def _pad_rows(out: Sampled, size: int) -> Sampled:
    return jax.tree.map(lambda a: jnp.pad(a, [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)),
                        out)


def _sample(logits, processed, params: SamplingBatch, mode: str, want_logprobs: bool,
            min_p=None) -> Sampled:
    """Draw from ``processed`` logits; logprobs are the model's own (``logits``), as vLLM
    reports them by default."""
    s, v = logits.shape
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    is_greedy = params.temperature == 0
    keys = jax.vmap(_row_key)(params.seed_lo, params.seed_hi, params.index, params.position)
    x = processed / jnp.where(is_greedy, 1.0, params.temperature)[:, None]
    if min_p is not None:
        x = apply_min_p(x, min_p)

    if mode == "greedy":
        tokens = greedy
    elif mode == "random":
        tokens = jnp.where(is_greedy, greedy,
                           jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32))
    elif mode in ("top_p", "filtered"):
        # A row without top-k / top-p keeps every token, so it draws exactly what it would in
        # a "random" batch (and a top-p row what it would in a "filtered" one): a row's
        # tokens never depend on what else shares its batch.
        keep = filter_mask(x, params.top_k if mode == "filtered" else None, params.top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, x, -jnp.inf))
        tokens = jnp.where(is_greedy, greedy, drawn.astype(jnp.int32))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = min(MAX_LOGPROBS, v)
    if want_logprobs:
        top_lp, top_ids = top_k(logprobs, k)
    else:
        top_ids, top_lp = jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32)
    return Sampled(tokens, chosen, top_ids, top_lp)


# Width of the blocks :func:`top_k` keeps or drops whole; Scout's 202,048 logits make 1,579.
TOP_K_BLOCK = 128


def top_k(x: jax.Array, k: int, block: int = TOP_K_BLOCK) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` over the last axis (the same values and int32 ids, ties to the
    lower id) without sorting whole rows: XLA's GPU top-k over a 202k vocabulary is ~28 sort
    kernels, ~0.45 ms of an H100 decode step. The top ``k`` lie in the ``k`` blocks of
    ``block`` entries with the largest maxima (a block holding one of them has a maximum at
    least the k-th value, and at most ``k`` blocks do, ties going to the lower block as
    they do to the lower id), so one max over each block, a top-k of the maxima and one of
    those ``k * block`` candidates, kept in id order, find them."""
    *lead, v = x.shape
    num_blocks = -(-v // block)
    if num_blocks <= k:
        vals, ids = lax.top_k(x, k)
        return vals, ids.astype(jnp.int32)
    # Padding is -inf at ids past the row's end: it ties only a -inf entry, and loses.
    pad = [(0, 0)] * len(lead) + [(0, num_blocks * block - v)]
    blocks = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(*lead, num_blocks, block)
    _, chosen = lax.top_k(blocks.max(axis=-1), k)  # [..., k] block ids
    chosen = jnp.sort(chosen, axis=-1)  # id order, so the last top-k breaks ties as lax's does
    candidates = jnp.take_along_axis(blocks, chosen[..., None], axis=-2)  # [..., k, block]
    vals, at = lax.top_k(candidates.reshape(*lead, k * block), k)
    ids = jnp.take_along_axis(chosen, at // block, axis=-1) * block + at % block
    return vals, ids.astype(jnp.int32)


class PenaltySeed(NamedTuple):
    """A sequence taking row ``slot`` of the penalty table: its tokens so far."""

    slot: int
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    pending_row: int | None  # its token still in flight: this row of the previous draws


def seed_arrays(seeds: Sequence[PenaltySeed], num_rows: int, num_slots: int) -> list[tuple]:
    """:func:`seed_rows` arguments (host arrays, all but ``prev_tokens``) that write
    ``seeds``: one call per :data:`SEED_CHUNK` token entries, the resets and in-flight
    tokens in the first. ``num_rows``: the step's row count; ``num_slots``: the spare row."""
    if not seeds:
        return []
    spare = num_slots
    reset = np.full(num_rows, spare, np.int32)
    pend_slots = np.full(num_rows, spare, np.int32)
    pend_rows = np.zeros(num_rows, np.int32)
    slots, ids, values = [], [], []
    for i, sd in enumerate(seeds):
        reset[i] = sd.slot
        if sd.pending_row is not None:
            pend_slots[i], pend_rows[i] = sd.slot, sd.pending_row
        prompt = np.unique(np.asarray(sd.prompt_ids, np.int64))
        out, counts = np.unique(np.asarray(sd.output_ids, np.int64), return_counts=True)
        ids += [prompt, out]
        values += [np.full(len(prompt), _PROMPT_BIT, np.int64), counts]
        slots.append(np.full(len(prompt) + len(out), sd.slot, np.int64))
    slots, ids, values = (np.concatenate(a) for a in (slots, ids, values))
    calls = []
    for start in range(0, max(len(ids), 1), SEED_CHUNK):
        n = min(SEED_CHUNK, len(ids) - start)
        sl = np.full(SEED_CHUNK, spare, np.int32)
        ii = np.zeros(SEED_CHUNK, np.int32)
        vv = np.zeros(SEED_CHUNK, np.int32)
        sl[:n], ii[:n], vv[:n] = (a[start:start + n] for a in (slots, ids, values))
        first = start == 0
        calls.append((reset if first else np.full(num_rows, spare, np.int32), sl, ii, vv,
                      pend_slots if first else np.full(num_rows, spare, np.int32), pend_rows))
    return calls
