"""Decode work list: placeholder until the split-KV Mosaic decode kernel lands.

Computes the decode items with the pure-JAX plan executor so that the
dispatcher in :mod:`jaxattn.kernels` is complete; the decode kernel replaces
this module with the same signature.
"""

from jaxattn import executor


def decode_attention(q, k_pages, v_pages, page_table, kv_lens, items, *, bounds, scale, causal,
                     chunk_size, interpret=False):
    """out [T, Hq, D] f32 and lse [T, Hq] f32 of the rows the decode items cover (others 0 / -inf)."""
    del interpret
    return executor.execute_items(items, q, k_pages, v_pages, page_table, kv_lens, bounds=bounds,
                                  scale=scale, causal=causal, chunk_size=chunk_size)
