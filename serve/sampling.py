"""Token sampling on the device: one jitted function over a static-shape batch of rows.

Every row (a sequence of the step, padded to ``max_num_seqs``) carries its
own temperature, top-k, top-p and PRNG key, so greedy and sampled requests
share one call and one compile. The key of a row is derived from (request
seed, output index n, token position in the output): a sequence's tokens do
not depend on what else is in the batch, and a sequence preempted and
recomputed draws the same tokens again.

The full-vocabulary sort that top-k / top-p need runs only when some row
asks for them. Which path a batch takes (:data:`MODES`) and whether it wants
top logprobs are decided on the host, from the rows, and compiled as separate
variants (all at warm-up): a ``lax.cond`` on a device value would make XLA copy
the predicate to the host and wait for the model step, so the engine could not
enqueue the next step while this one runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.serve.sampling_params import MAX_LOGPROBS


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


# How a batch draws: every row greedy; some row sampled, none with top-k / top-p; or some
# row with top-k / top-p (a full-vocabulary sort).
MODES = ("greedy", "random", "filtered")


def mode_of(params: SamplingBatch) -> str:
    """The cheapest of :data:`MODES` that serves every row of ``params`` (host arrays)."""
    sampled = np.asarray(params.temperature) != 0
    if not sampled.any():
        return "greedy"
    if (sampled & ((np.asarray(params.top_k) > 0) | (np.asarray(params.top_p) < 1))).any():
        return "filtered"
    return "random"


def draw(logits, params: SamplingBatch, want_logprobs: bool) -> Sampled:
    """Sample one token per row (asynchronously: the result stays on the device)."""
    return sample(logits, params, mode=mode_of(params), want_logprobs=bool(want_logprobs))


@functools.partial(jax.jit, static_argnames=("mode", "want_logprobs"))
def sample(logits, params: SamplingBatch, *, mode: str, want_logprobs: bool) -> Sampled:
    """logits [S, V] f32 -> one token per row; ``mode`` one of :data:`MODES` (see :func:`draw`)."""
    s, v = logits.shape
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = params.temperature == 0
    keys = jax.vmap(_row_key)(params.seed_lo, params.seed_hi, params.index, params.position)
    x = logits / jnp.where(is_greedy, 1.0, params.temperature)[:, None]

    if mode == "greedy":
        tokens = greedy
    elif mode == "random":
        tokens = jnp.where(is_greedy, greedy,
                           jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32))
    elif mode == "filtered":
        order = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
        neg, ids = lax.sort_key_val(-x, order, dimension=-1)  # descending logits
        vals, rank = -neg, jnp.arange(v)[None, :]
        keep = (params.top_k[:, None] == 0) | (rank < params.top_k[:, None])
        probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep &= before < params.top_p[:, None]  # the top token always stays
        # Back to vocabulary order before drawing, so that a row without top-k / top-p
        # draws exactly what it would in a "random" batch: a row's tokens never depend on
        # what else shares its batch.
        keep = jnp.zeros_like(keep).at[jnp.arange(s)[:, None], ids].set(keep)
        drawn = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, x, -jnp.inf))
        tokens = jnp.where(is_greedy, greedy, drawn.astype(jnp.int32))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = min(MAX_LOGPROBS, v)
    if want_logprobs:
        top_lp, top_ids = lax.top_k(logprobs, k)
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_ids, top_lp = jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32)
    return Sampled(tokens, chosen, top_ids, top_lp)
