"""The model's own sampling defaults, from its ``generation_config.json``.

A checkpoint may say how it wants to be sampled (Llama 4 Scout's says ``temperature`` 0.6,
``top_p`` 0.9). Those values apply wherever a request leaves the field out; the
precedence, highest first:

1. the request's own value (an HTTP request's field, a JSONL line's field, an explicit
   :class:`SamplingParams` given to ``LLM.generate``);
2. the command line's flag, for ``python -m jaxattn.generate`` (``--temperature`` ...);
3. the model's ``generation_config.json`` (:data:`FIELDS` only);
4. :class:`SamplingParams`' own defaults (temperature 1.0, top_p 1.0, top_k off).

``LLM.generate(prompts)`` with no sampling params at all uses 3 then 4, as vLLM's
``LLM.get_default_sampling_params()`` does; a SamplingParams passed in is taken as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from jaxattn.serve.sampling_params import SamplingParams

log = logging.getLogger("jaxattn.serve")

FIELDS = ("temperature", "top_p", "top_k")


def sampling_defaults(model_dir: str | None) -> dict:
    """The :data:`FIELDS` the model's ``generation_config.json`` sets (and SamplingParams
    accepts); {} without the file. A value SamplingParams refuses is left out, with a warning."""
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    out = {}
    for name in FIELDS:
        if cfg.get(name) is None:
            continue
        try:
            SamplingParams(**{name: cfg[name]})
        except (TypeError, ValueError) as e:
            log.warning("%s: ignoring %s=%r (%s)", path, name, cfg[name], e)
            continue
        out[name] = cfg[name]
    return out


def apply(params: SamplingParams, defaults: dict, given) -> SamplingParams:
    """``params`` with each default field the caller did not give (``given``: field names)
    taken from ``defaults``."""
    missing = {k: v for k, v in defaults.items() if k not in given}
    return dataclasses.replace(params, **missing) if missing else params
