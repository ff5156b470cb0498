"""pytest plugin (-p force_f16): the prefill kernel's f16 V tiles wherever a cache is FP8."""
from jaxattn.kernels import prefill

_pick = prefill.pick_config


def _f16(*a, **k):
    k.setdefault("f16_pv", True)
    return _pick(*a, **k)


prefill.pick_config = _f16
