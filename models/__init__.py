"""Model implementations (import name ``jaxattn.models``)."""
