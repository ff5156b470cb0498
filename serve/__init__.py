"""Serving: engine, OpenAI-compatible HTTP server (import name ``jaxattn.serve``)."""
