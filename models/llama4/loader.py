"""Hugging Face checkpoints <-> the NNX model, tensor by tensor.

Loading never holds more than one checkpoint tensor on the host: each tensor is
read with ``safe_open``, put on the device(s) with its sharding, cast and (for
the fused expert tensor) split there, and dropped before the next is read.
Where each tensor goes, its expected shape and its PartitionSpec come from one
table, :func:`tensor_map` (mesh axes of :mod:`jaxattn.parallel`; axes a mesh
lacks are replicated). On a mesh each device receives only its shard: every
shard is read from the file as a slice (``jax.make_array_from_callback`` over
``safe_open(...).get_slice``), so host memory stays within one tensor and a
host of a multi-host mesh reads only what its own devices hold.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxattn.parallel import EXPERT, MODEL, TENSOR
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.model import Llama4ForCausalLM

# Prefix of the text model inside Llama4ForConditionalGeneration checkpoints, and the
# prefixes of the parts a text model does not use.
MULTIMODAL_PREFIX = "language_model."
SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One checkpoint tensor: its HF name and shape, and the model parameters it fills.

    With ``split_axis`` set, the tensor is cut into ``len(targets)`` equal parts along
    that axis, in order (HF's ``gate_up_proj.chunk(2, dim=-1)``: gate, then up).
    """

    name: str
    shape: tuple[int, ...]
    targets: tuple[tuple, ...]  # attribute paths in the model
    specs: tuple[P, ...]  # PartitionSpec per target
    split_axis: int | None = None


def tensor_map(config: Llama4Config) -> list[TensorMap]:
    """Every tensor of a ``Llama4ForCausalLM`` checkpoint, in file order."""
    c = config
    h, d, e = c.hidden_size, c.head_dim, c.num_local_experts
    hq, hkv = c.num_attention_heads * d, c.num_key_value_heads * d
    out = []

    def add(name, shape, spec, split=None, targets=None):
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        out.append(TensorMap(name, tuple(shape), targets or (path,),
                             spec if isinstance(spec, tuple) else (spec,), split))

    # Vocabulary-parallel embedding and LM head (replicated when the vocabulary does not
    # divide: models.llama4.sharding decides).
    add("model.embed_tokens.weight", (c.vocab_size, h), P(MODEL, None))
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        add(pre + "input_layernorm.weight", (h,), P())
        add(pre + "post_attention_layernorm.weight", (h,), P())
        # Column-parallel projections split heads; the output projection is row-parallel.
        for proj, rows in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
            add(pre + f"self_attn.{proj}.weight", (rows, h), P(MODEL, None))
            if c.attention_bias:
                add(pre + f"self_attn.{proj}.bias", (rows,), P(MODEL))
        add(pre + "self_attn.o_proj.weight", (h, hq), P(None, MODEL))
        if c.attention_bias:
            add(pre + "self_attn.o_proj.bias", (h,), P())
        ff = pre + "feed_forward."
        if c.is_moe(i):
            inter = c.intermediate_size
            add(ff + "router.weight", (e, h), P())
            base = tuple(int(p) if p.isdigit() else p for p in (ff + "experts").split("."))
            # Experts over the expert axis, their columns over the tensor axis.
            add(ff + "experts.gate_up_proj", (e, h, 2 * inter),
                (P(EXPERT, None, TENSOR), P(EXPERT, None, TENSOR)), split=2,
                targets=(base + ("gate_proj",), base + ("up_proj",)))
            add(ff + "experts.down_proj", (e, inter, h), P(EXPERT, TENSOR, None))
            mlp, mlp_inter = ff + "shared_expert.", inter
        else:
            mlp, mlp_inter = ff, c.intermediate_size_mlp
        add(mlp + "gate_proj.weight", (mlp_inter, h), P(MODEL, None))
        add(mlp + "up_proj.weight", (mlp_inter, h), P(MODEL, None))
        add(mlp + "down_proj.weight", (h, mlp_inter), P(None, MODEL))
    add("model.norm.weight", (h,), P())
    if not c.tie_word_embeddings:
        add("lm_head.weight", (c.vocab_size, h), P(MODEL, None))
    return out


def _slices(index, shape) -> tuple[slice, ...]:
    """A shard index from make_array_from_callback as explicit (start, stop) slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _read_sharded(f, key: str, t: TensorMap, part: int, sharding, dtype):
    """One target of tensor ``t`` as a (sharded) device array, reading only each shard's slice.

    Part ``part`` of a fused tensor is the slice ``[part * n, (part + 1) * n)`` of its split
    axis, so a shard of ``up_proj`` is read straight out of ``gate_up_proj``.
    """
    shape = list(t.shape)
    if t.split_axis is not None:
        shape[t.split_axis] //= len(t.targets)
    sl = f.get_slice(key)
    cache = {}  # replicated shards ask for the same slice once per device: read it once

    def read(index):
        idx = _slices(index, shape)
        k = tuple((s.start, s.stop) for s in idx)
        if k not in cache:
            if t.split_axis is not None:
                s, off = idx[t.split_axis], part * shape[t.split_axis]
                idx = idx[:t.split_axis] + (slice(s.start + off, s.stop + off),) \
                    + idx[t.split_axis + 1:]
            cache[k] = sl[idx]
        return cache[k]

    out = jax.make_array_from_callback(tuple(shape), sharding, read)
    if dtype is not None and out.dtype != dtype:  # cast on the device: no second host copy
        out = _caster(jnp.dtype(dtype).name, sharding)(out)
    # Transfers run asynchronously and hold the host buffers: finish them before the
    # next tensor is read, so host memory stays at about one tensor.
    jax.block_until_ready(out)
    return out


@functools.lru_cache(maxsize=None)
def _caster(dtype: str, sharding):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


def _variable(model, path):
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _checkpoint_index(path: str) -> dict[str, str]:
    """Tensor name -> file: the index of a sharded checkpoint, else ``model.safetensors`` (as HF)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    with safe_open(single, "np") as f:
        return {k: single for k in f.keys()}


def _text_names(names: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Model name -> (checkpoint name, file): strips the multimodal prefix, drops the vision tower."""
    multimodal = any(k.startswith(MULTIMODAL_PREFIX) for k in names)
    out = {}
    for key, file in names.items():
        if multimodal:
            if key.startswith(SKIPPED_PREFIXES):
                continue
            name = key[len(MULTIMODAL_PREFIX):] if key.startswith(MULTIMODAL_PREFIX) else key
        else:
            name = key
        out[name] = (key, file)
    return out


def _listing(names, limit=8):
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load(path: str | os.PathLike, *, dtype=None, mesh=None) -> Llama4ForCausalLM:
    """A ``Llama4ForCausalLM`` or ``Llama4ForConditionalGeneration`` directory -> the text model.

    ``dtype``: cast every weight to it; None keeps each tensor's stored dtype (so ``save``
    writes back identical tensors). ``mesh``: a ``jax.sharding.Mesh`` with the axes of
    :mod:`jaxattn.parallel` (one replica: expert x tensor); each device receives only its
    shards, and the model runs per device on it (``model.mesh``). None puts all on the
    first device. Raises ValueError naming missing, unexpected or mis-shaped tensors.
    """
    path = os.fspath(path)
    config = Llama4Config.from_pretrained(path)
    tmap = tensor_map(config)
    available = _text_names(_checkpoint_index(path))
    expected = {t.name for t in tmap}
    missing = expected - available.keys()
    unexpected = available.keys() - expected
    if config.tie_word_embeddings:
        unexpected.discard("lm_head.weight")  # HF ignores a stored copy of a tied head
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the config: "
                         + (f"missing tensors: {_listing(missing)}. " if missing else "")
                         + (f"unexpected tensors: {_listing(unexpected)}." if unexpected else ""))

    from jaxattn.models.llama4 import sharding as sharding_lib

    if mesh is not None:
        sharding_lib.check(config, mesh)
    table = sharding_lib.spec_table(config, mesh)
    target_dtype = None if dtype is None else jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: Llama4ForCausalLM(
        config, dtype=target_dtype or jnp.float32, rngs=nnx.Rngs(0)))
    by_file: dict[str, list[TensorMap]] = {}
    for t in tmap:
        by_file.setdefault(available[t.name][1], []).append(t)
    for file, tensors in by_file.items():
        with safe_open(file, "np") as f:
            for t in tensors:
                key = available[t.name][0]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != t.shape:
                    raise ValueError(f"tensor {key} in {file} has shape {shape}, expected {t.shape}")
                for part, target in enumerate(t.targets):
                    sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None else
                                NamedSharding(mesh, table[target][0]))
                    value = _read_sharded(f, key, t, part, sharding, target_dtype)
                    _variable(model, target).set_value(value)
    model.mesh = mesh
    return model


def _hf_config(config: Llama4Config) -> dict:
    d = config.to_hf_dict()
    if d.get("model_type") != "llama4_text":  # e.g. loaded from a multimodal text_config
        d["model_type"] = "llama4_text"
    d.setdefault("architectures", ["Llama4ForCausalLM"])
    return d


def save(model: Llama4ForCausalLM, path: str | os.PathLike, *,
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors in the ``Llama4ForCausalLM`` layout (fused expert
    tensor re-joined), sharded with an index past ``max_shard_bytes``; host memory: one shard."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tmap = tensor_map(model.config)
    sizes = []
    for t in tmap:
        v = _variable(model, t.targets[0]).get_value()
        sizes.append(int(np.prod(t.shape)) * jnp.dtype(v.dtype).itemsize)
    shards, current, used = [], [], 0
    for t, size in zip(tmap, sizes):
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(t)
        used += size
    shards.append(current)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {}
        for t in shard:
            parts = [np.asarray(jax.device_get(_variable(model, p).get_value())) for p in t.targets]
            tensors[t.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, t.split_axis)
            weight_map[t.name] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(model.config), f, indent=2, sort_keys=True)
