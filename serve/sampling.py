"""Token sampling on the device: one jitted function over a static-shape batch of rows.

Every row (a sequence of the step, padded to ``max_num_seqs``) carries its
own temperature, top-k, top-p and PRNG key, so greedy and sampled requests
share one call and one compile. The key of a row is derived from (request
seed, output index n, token position in the output): a sequence's tokens do
not depend on what else is in the batch, and a sequence preempted and
recomputed draws the same tokens again.

The full-vocabulary sort that top-k / top-p need runs only when some row
asks for them (``lax.cond``: both branches are compiled once, at warm-up).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.serve.sampling_params import MAX_LOGPROBS


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


@jax.jit
def sample(logits, params: SamplingBatch, want_logprobs) -> Sampled:
    """logits [S, V] f32 -> one token per row. ``want_logprobs``: bool scalar (top-k logprobs)."""
    s, v = logits.shape
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = params.temperature == 0
    keys = jax.vmap(_row_key)(params.seed_lo, params.seed_hi, params.index, params.position)

    def sampled(_):
        x = logits / jnp.where(is_greedy, 1.0, params.temperature)[:, None]

        def filtered(x):
            order = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
            neg, ids = lax.sort_key_val(-x, order, dimension=-1)  # descending logits
            vals, rank = -neg, jnp.arange(v)[None, :]
            keep = (params.top_k[:, None] == 0) | (rank < params.top_k[:, None])
            probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
            keep &= before < params.top_p[:, None]  # the top token always stays
            choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, vals, -jnp.inf))
            return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

        def plain(x):
            return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

        needs_sort = jnp.any(~is_greedy & ((params.top_k > 0) | (params.top_p < 1)))
        drawn = lax.cond(needs_sort, filtered, plain, x)
        return jnp.where(is_greedy, greedy, drawn)

    tokens = lax.cond(jnp.all(is_greedy), lambda _: greedy, sampled, None)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = min(MAX_LOGPROBS, v)

    def top(_):
        lp, ids = lax.top_k(logprobs, k)
        return ids.astype(jnp.int32), lp

    top_ids, top_lp = lax.cond(want_logprobs, top,
                               lambda _: (jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32)),
                               None)
    return Sampled(tokens, chosen, top_ids, top_lp)
