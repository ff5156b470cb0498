"""Pallas Mosaic GPU attention kernels (import name ``jaxattn.kernels``).

Not built yet: ``AVAILABLE`` is False and the entry points raise
NotImplementedError, so ``impl="auto"`` uses the reference everywhere.
"""

import jax.numpy as jnp

AVAILABLE = False
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


def supports(head_dim: int, dtype) -> bool:
    return head_dim in HEAD_DIMS and dtype in DTYPES


def ragged_paged_attention(*args, **kwargs):
    raise NotImplementedError("the Mosaic GPU ragged paged attention kernels are not built yet")


def attention(*args, **kwargs):
    raise NotImplementedError("the Mosaic GPU attention kernels are not built yet")
