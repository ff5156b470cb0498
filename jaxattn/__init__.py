"""jaxattn: long-context Llama 4 serving on JAX with Pallas Mosaic GPU attention kernels.

Public attention API::

    jaxattn.attention(q, k, v, causal=True, chunk_size=None, ...)        # contiguous batches
    jaxattn.ragged_paged_attention(q, k_pages, v_pages, page_table,       # serving form
                                   cu_q_lens, kv_lens, num_seqs, bounds=...)

Serving (loaded on first use, so ``import jaxattn`` stays light)::

    jaxattn.LLM(model=DIR, max_model_len=...).generate(prompts, jaxattn.SamplingParams(...))

``jaxattn.planner`` holds the static-shape tile planner (``Bounds``, ``capacity``,
``plan``); ``jaxattn.reference`` the pure-JAX oracle; ``jaxattn.executor`` a pure-JAX walk
of a plan. The serving runtime lives in ``jaxattn.serve`` (``jaxattn.serve.config.EngineConfig``).

"""

from jaxattn.api import attention, ragged_paged_attention
from jaxattn.planner import Bounds, Capacity, Plan, capacity, plan

__all__ = ["attention", "ragged_paged_attention", "Bounds", "Capacity", "Plan", "capacity", "plan",
           "LLM", "SamplingParams", "StructuredOutput", "EngineConfig"]
__version__ = "0.1.0"

_LAZY = {"LLM": "jaxattn.serve.llm", "SamplingParams": "jaxattn.serve.sampling_params",
         "StructuredOutput": "jaxattn.serve.structured", "EngineConfig": "jaxattn.serve.config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")
