"""Llama 4 text model in Flax NNX (import name ``jaxattn.models.llama4``).

``load``/``save`` a Hugging Face checkpoint, ``init_random`` for tests and the
embedded default model, ``model(input_ids)`` for the full forward. The serving
step over the paged KV cache is :mod:`jaxattn.serve.model_runner`'s.
"""

from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.loader import load, save, tensor_map
from jaxattn.models.llama4.model import (Llama4ForCausalLM, init_random, kv_replicas, local_heads,
                                         stored_kv_heads)

__all__ = ["Llama4Config", "Llama4ForCausalLM", "load", "save", "tensor_map", "init_random",
           "kv_replicas", "local_heads", "stored_kv_heads"]
