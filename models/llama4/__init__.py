"""Llama 4 text model in Flax NNX (import name ``jaxattn.models.llama4``)."""
