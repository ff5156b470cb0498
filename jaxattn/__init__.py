"""jaxattn: long-context Llama 4 serving on JAX with Pallas Mosaic GPU attention kernels.

Public attention API::

    jaxattn.attention(q, k, v, causal=True, chunk_size=None, ...)        # contiguous batches
    jaxattn.ragged_paged_attention(q, k_pages, v_pages, page_table,       # serving form
                                   cu_q_lens, kv_lens, num_seqs, bounds=...)

``jaxattn.scheduler`` holds the static-shape planner (``Bounds``, ``capacity``,
``plan``); ``jaxattn.reference`` the pure-JAX oracle.
"""

from jaxattn.api import attention, ragged_paged_attention
from jaxattn.scheduler import Bounds, Capacity, Plan, capacity, plan

__all__ = ["attention", "ragged_paged_attention", "Bounds", "Capacity", "Plan", "capacity", "plan"]
__version__ = "0.1.0"
