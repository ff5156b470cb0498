"""Which Llama 4 weights are FP8, and FP8 checkpoints' ``quantization_config``.

:class:`Fp8Scheme` says which linear layers hold float8_e4m3fn weights with per-output-
channel f32 scales (activations are quantised per token at run time, see
:mod:`jaxattn.kernels.fp8`). The default, ``quantization="fp8"``:

* routed experts: FP8. They are 97% of Scout's weights (the 215 GB -> 108 GB) and the
  prefill FLOPs; the FP8 grouped matmul runs them.
* shared expert and the dense layers' MLP: FP8 (XLA's FP8 dot), as published FP8 Llama 4
  checkpoints and Meta's ``fp8_mixed`` do for the expert MLPs.
* attention projections: bf16, as a published FP8 Scout leaves them. They are 3% of
  Scout's weights (6.0 GB in bf16), and at prefill their GEMMs ([T, 5120] x [5120,
  5120/1024]) are a small part of a layer next to the experts and attention itself. But a
  batch-1 decode step on one GPU reads all of them: 29% of its bytes.
  ``Fp8Scheme(attention=True)`` turns them FP8 (the same ``Linear`` path); ``python -m
  benchmarks.multigpu --quantization fp8 --fp8-attention`` times it (batch-1 decode at 8k
  on one H200: 10.72 ms per step against 11.50 without, README).
* embeddings, router, norms and LM head: never (small, and the router's and head's
  outputs are sensitive: routing decisions and logits).

Checkpoints in the compressed-tensors format (``quant_method: compressed-tensors``,
FP8 ``channel`` weights, ``dynamic`` ``token`` activations; e.g. llm-compressor's
``FP8_DYNAMIC`` scheme) load into the same parameters: :func:`checkpoint_scheme`
reads and checks their ``quantization_config``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

QUANTIZATIONS = ("fp8",)


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """Which linear layers are FP8 (static: part of the model's structure)."""

    experts: bool = True  # routed experts
    mlp: bool = True  # the shared expert and the dense layers' MLP
    attention: bool = False  # q/k/v/o projections (see the module docstring)
    # Cap on an activation row's absmax (Meta's activation_scale_ub); None: no cap.
    activation_scale_ub: float | None = None

    def __post_init__(self):
        if self.activation_scale_ub is not None and not self.activation_scale_ub > 0:
            raise ValueError(f"activation_scale_ub must be > 0, got {self.activation_scale_ub}")


def scheme(quantization: str | None) -> Fp8Scheme | None:
    """The scheme a ``--quantization`` value stands for (None: unquantised)."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS} or None")
    return Fp8Scheme()


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """A compressed-tensors FP8 checkpoint's ``quantization_config``, checked."""

    ignore: tuple[str, ...]  # module names or "re:" patterns left unquantised

    def ignored(self, module: str) -> bool:
        """Whether ``module`` (full checkpoint name, without ``.weight``) is in ``ignore``."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif entry == module:
                return True
        return False


def _check_group(name: str, group: dict) -> None:
    w, a = group.get("weights") or {}, group.get("input_activations")
    want = "float 8-bit weights with strategy 'channel', symmetric"
    if (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("symmetric", True),
            w.get("dynamic", False)) != ("float", 8, "channel", True, False):
        raise ValueError(f"quantization_config group {name}: weights {w} are not supported "
                         f"(supported: {want})")
    if a is not None and (a.get("type"), a.get("num_bits"), a.get("strategy"),
                          a.get("dynamic")) != ("float", 8, "token", True):
        raise ValueError(f"quantization_config group {name}: input activations {a} are not "
                         "supported (supported: float 8-bit, dynamic, strategy 'token')")
    if group.get("output_activations"):
        raise ValueError(f"quantization_config group {name}: output activations are not supported")


def checkpoint_scheme(path: str | os.PathLike) -> CheckpointQuantization | None:
    """The FP8 quantisation a checkpoint directory was saved with; None for an unquantised
    one. ValueError for a quantisation this loader cannot run (method or scheme)."""
    with open(os.path.join(os.fspath(path), "config.json")) as f:
        d = json.load(f)
    qc = d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"checkpoint {path}: quant_method {method!r} is not supported "
                         "(supported: 'compressed-tensors' FP8)")
    fmt = qc.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(f"checkpoint {path}: compressed-tensors format {fmt!r} is not supported "
                         "(supported: 'float-quantized')")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError(f"checkpoint {path}: quantization_config has no config_groups")
    for name, group in groups.items():
        _check_group(name, group)
    if qc.get("kv_cache_scheme"):
        raise ValueError(f"checkpoint {path}: a quantised KV cache scheme is not supported")
    return CheckpointQuantization(ignore=tuple(qc.get("ignore") or ()))
