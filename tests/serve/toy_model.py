"""A tiny deterministic stand-in for the Llama 4 runner (the engine's ModelRunner protocol).

One attention layer over the real paged KV cache (``jaxattn.cache.write`` +
``jaxattn.ragged_paged_attention``), so a wrong page table, slot or
``num_cached`` from the engine changes its outputs just as it would a real
model's. Used until the real model is available to these tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import cache
from jaxattn.batch import StepBatch

D, HQ, HKV, HD = 32, 2, 1, 16


class ToyRunner:
    def __init__(self, *, vocab_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_pages: int, page_size: int = 16, seed: int = 0):
        self.bounds = jaxattn.Bounds(max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens,
                                     max_model_len=max_model_len, page_size=page_size,
                                     num_q_heads=HQ, num_kv_heads=HKV, head_dim=HD)
        self.num_pages, self.vocab_size = num_pages, vocab_size
        r = np.random.default_rng(seed)
        self.weights = {
            "embed": jnp.asarray(r.standard_normal((vocab_size, D)), jnp.float32),
            "wq": jnp.asarray(r.standard_normal((D, HQ * HD)) / D ** 0.5, jnp.float32),
            "wk": jnp.asarray(r.standard_normal((D, HKV * HD)) / D ** 0.5, jnp.float32),
            "wv": jnp.asarray(r.standard_normal((D, HKV * HD)) / D ** 0.5, jnp.float32),
            "wo": jnp.asarray(r.standard_normal((HQ * HD, D)) / D ** 0.5, jnp.float32),
            "unembed": jnp.asarray(r.standard_normal((D, vocab_size)) * 3 / D ** 0.5, jnp.float32),
        }
        spec = cache.CacheSpec(num_layers=1, num_pages=num_pages, page_size=page_size,
                               num_kv_heads=HKV, head_dim=HD, dtype="float32")
        self._kv = jax.device_put(cache.allocate(spec), jax.devices()[0])
        self.jitted = jax.jit(functools.partial(_step, bounds=self.bounds), donate_argnums=(1,))

    def step(self, batch: StepBatch):
        logits, self._kv = self.jitted(self.weights, self._kv, StepBatch(*map(np.asarray, batch)))
        return logits


def _step(w, kv, batch: StepBatch, *, bounds):
    t = batch.token_ids.shape[0]
    pos = batch.positions.astype(jnp.float32)[:, None]
    freqs = jnp.exp(-jnp.arange(D // 2) / 4.0)
    x = w["embed"][batch.token_ids] + jnp.concatenate([jnp.sin(pos * freqs), jnp.cos(pos * freqs)], -1)
    q = (x @ w["wq"]).reshape(t, HQ, HD)
    k = (x @ w["wk"]).reshape(t, HKV, HD)
    v = (x @ w["wv"]).reshape(t, HKV, HD)
    k_pages, v_pages = cache.write(kv.k[0], kv.v[0], k, v, batch.slots)
    o = jaxattn.ragged_paged_attention(q, k_pages, v_pages, batch.page_table, batch.cu_q_lens,
                                       batch.kv_lens, batch.num_seqs, bounds=bounds,
                                       impl="reference")
    # The attention output dominates, so each token depends on its whole context (and the
    # cache contents), not just on the previous token.
    h = 0.3 * x + 3.0 * o.reshape(t, HQ * HD) @ w["wo"]
    logits = h[batch.logits_indices] @ w["unembed"]
    return logits.astype(jnp.float32), cache.KVCache(k=(k_pages,), v=(v_pages,))
