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

FP8 (:mod:`jaxattn.models.llama4.quantization`): with ``quantization="fp8"`` a bf16
checkpoint is quantised while it loads, tensor by tensor on the device (the bf16
tensor is read, quantised per output channel there and dropped: the host never holds
more than one tensor, the device one bf16 tensor beside the FP8 model). Checkpoints
in the compressed-tensors FP8 format load as they are: their linear layers hold
``X.weight`` (float8_e4m3fn, ``[out, in]``) and ``X.weight_scale`` (``[out, 1]``), and
the routed experts are per-expert linears, ``feed_forward.experts.{e}.gate_proj.weight``
(``[I, H]``), ``up_proj`` and ``down_proj`` (``[H, I]``), as llm-compressor writes Llama 4
(it unfuses ``gate_up_proj`` to quantise each expert; vLLM's Llama 4 loader reads both
forms), stacked here into ``[E, out, in]``. Any linear the scheme keeps bf16 but the
checkpoint stores in FP8 is dequantised on the device, and the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.parallel import EXPERT, MODEL, TENSOR
from jaxattn.models.llama4 import quantization as quant_lib
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.model import Llama4ForCausalLM, kv_replicas
from jaxattn.models.llama4.quantization import Fp8Scheme

# Prefix of the text model inside Llama4ForConditionalGeneration checkpoints, and the
# prefixes of the parts a text model does not use.
MULTIMODAL_PREFIX = "language_model."
SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class Param:
    """One model parameter: attribute path, global shape, PartitionSpec and kind ("weight":
    the model's dtype; "fp8": float8_e4m3fn; "scale": f32 per output channel)."""

    path: tuple
    shape: tuple[int, ...]
    spec: P
    kind: str = "weight"


def _axis(spec: P, i: int):
    return spec[i] if i < len(spec) else None


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One checkpoint tensor: its HF name and shape, and the model parameters it fills.

    With ``split_axis`` set, the tensor is cut into ``len(targets)`` equal parts along
    that axis, in order (HF's ``gate_up_proj.chunk(2, dim=-1)``: gate, then up).
    ``specs`` are for the tensor as HF lays it out. ``fp8``: the targets are FP8 weights,
    each with a scale parameter; ``experts``: HF's ``[E, K, N]`` expert tensor, whose FP8
    form is K-major ``[E, N, K]``.
    """

    name: str
    shape: tuple[int, ...]
    targets: tuple[tuple, ...]  # attribute paths in the model
    specs: tuple[P, ...]  # PartitionSpec per target
    split_axis: int | None = None
    fp8: bool = False
    experts: bool = False
    # Rows are KV heads of this many rows each (the k/v projections): on a model-parallel
    # group larger than the KV heads, each head is stored once per device that reads it
    # (``replicas`` below; :func:`replicated_rows`).
    kv_head_rows: int | None = None

    def part_shape(self, replicas: int = 1) -> tuple[int, ...]:
        """One target's shape in HF's layout (a part of a fused tensor); ``replicas``: copies
        of each KV head (``llama4.kv_replicas``), which multiply a KV tensor's rows."""
        shape = list(self.shape)
        if self.split_axis is not None:
            shape[self.split_axis] //= len(self.targets)
        if self.kv_head_rows:
            shape[0] *= replicas
        return tuple(shape)

    def params(self, part: int, replicas: int = 1) -> tuple[Param, ...]:
        """The model parameters target ``part`` fills: the weight, and its scale when FP8."""
        target, spec, shape = self.targets[part], self.specs[part], self.part_shape(replicas)
        if not self.fp8:
            return (Param(target, shape, spec),)
        if self.experts:  # [E, K, N] -> K-major [E, N, K], scales [E, N]
            e, k, n = shape
            s0, sk, sn = _axis(spec, 0), _axis(spec, 1), _axis(spec, 2)
            return (Param(target, (e, n, k), P(s0, sn, sk), "fp8"),
                    Param(target[:-1] + (target[-1] + "_scale",), (e, n), P(s0, sn), "scale"))
        out = shape[0]  # a Linear's [out, in]
        return (Param(target, shape, spec, "fp8"),
                Param(target[:-1] + ("weight_scale",), (out,), P(_axis(spec, 0)), "scale"))


def tensor_map(config: Llama4Config, fp8: Fp8Scheme | None = None) -> list[TensorMap]:
    """Every tensor of a ``Llama4ForCausalLM`` checkpoint, in file order; ``fp8``: which of
    them the model holds in FP8."""
    c = config
    h, d, e = c.hidden_size, c.head_dim, c.num_local_experts
    hq, hkv = c.num_attention_heads * d, c.num_key_value_heads * d
    out = []

    def add(name, shape, spec, split=None, targets=None, quantized=False, experts=False,
            kv_head_rows=None):
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        out.append(TensorMap(name, tuple(shape), targets or (path,),
                             spec if isinstance(spec, tuple) else (spec,), split,
                             fp8=quantized, experts=experts, kv_head_rows=kv_head_rows))

    q_attn = fp8 is not None and fp8.attention
    q_mlp = fp8 is not None and fp8.mlp
    q_experts = fp8 is not None and fp8.experts

    # Vocabulary-parallel embedding and LM head (replicated when the vocabulary does not
    # divide: models.llama4.sharding decides).
    add("model.embed_tokens.weight", (c.vocab_size, h), P(MODEL, None))
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        add(pre + "input_layernorm.weight", (h,), P())
        add(pre + "post_attention_layernorm.weight", (h,), P())
        # Column-parallel projections split heads; the output projection is row-parallel.
        for proj, rows in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
            kv = None if proj == "q_proj" else d
            add(pre + f"self_attn.{proj}.weight", (rows, h), P(MODEL, None), quantized=q_attn,
                kv_head_rows=kv)
            if c.attention_bias:
                add(pre + f"self_attn.{proj}.bias", (rows,), P(MODEL), kv_head_rows=kv)
        add(pre + "self_attn.o_proj.weight", (h, hq), P(None, MODEL), quantized=q_attn)
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
                targets=(base + ("gate_proj",), base + ("up_proj",)), quantized=q_experts,
                experts=True)
            add(ff + "experts.down_proj", (e, inter, h), P(EXPERT, TENSOR, None),
                quantized=q_experts, experts=True)
            mlp, mlp_inter = ff + "shared_expert.", inter
        else:
            mlp, mlp_inter = ff, c.intermediate_size_mlp
        add(mlp + "gate_proj.weight", (mlp_inter, h), P(MODEL, None), quantized=q_mlp)
        add(mlp + "up_proj.weight", (mlp_inter, h), P(MODEL, None), quantized=q_mlp)
        add(mlp + "down_proj.weight", (h, mlp_inter), P(None, MODEL), quantized=q_mlp)
    add("model.norm.weight", (h,), P())
    if not c.tie_word_embeddings:
        add("lm_head.weight", (c.vocab_size, h), P(MODEL, None))
    return out


def _slices(index, shape) -> tuple[slice, ...]:
    """A shard index from make_array_from_callback as explicit (start, stop) slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _from_host(shape, sharding, read):
    """A (sharded) device array whose shards ``read(slices)`` returns from the host.

    Replicated shards ask for the same slice once per device: it is read once. The
    transfers hold the host buffers until they finish, so this waits for them: host
    memory stays at about one tensor.
    """
    cache = {}

    def shard(index):
        idx = _slices(index, shape)
        k = tuple((s.start, s.stop) for s in idx)
        if k not in cache:
            cache[k] = read(idx)
        return cache[k]

    out = jax.make_array_from_callback(tuple(shape), sharding, shard)
    jax.block_until_ready(out)
    return out


def replicated_rows(x, kv_head_rows: int, replicas: int):
    """Rows of KV heads (``kv_head_rows`` each) with every head repeated ``replicas`` times in
    a row: on a model-parallel group of ``replicas`` x KV heads devices, device ``i`` holds
    head ``i // replicas``, the one its query heads read. NumPy or jax arrays."""
    if replicas == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    heads = x.reshape(-1, kv_head_rows, *x.shape[1:])
    return xp.repeat(heads, replicas, axis=0).reshape(-1, *x.shape[1:])


def unreplicated_rows(x, kv_head_rows: int, replicas: int):
    """The inverse of :func:`replicated_rows`: each KV head's first copy (``save``)."""
    if replicas == 1:
        return x
    return x.reshape(-1, replicas, kv_head_rows, *x.shape[1:])[:, 0].reshape(-1, *x.shape[1:])


def _from_replicated_rows(read, kv_head_rows: int | None, replicas: int):
    """``read(idx)`` of a tensor whose rows are KV heads, as a reader of its replicated form:
    a shard's rows come from the rows of the KV heads they copy (each read once). Other
    tensors (``kv_head_rows`` None) are read as they are."""
    if replicas == 1 or not kv_head_rows:
        return read
    cache = {}

    def read_replicated(idx):
        rows, x, parts = idx[0], idx[0].start, []
        while x < rows.stop:
            head, off = divmod(x, kv_head_rows)
            end = min(rows.stop, (head + 1) * kv_head_rows)
            src = head // replicas * kv_head_rows + off
            piece = (slice(src, src + end - x),) + idx[1:]
            key = tuple((s.start, s.stop) for s in piece)
            if key not in cache:
                cache[key] = read(piece)
            parts.append(cache[key])
            x = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return read_replicated


def _read_part(sl, t: TensorMap, part: int, sharding, replicas: int = 1):
    """Target ``part`` of HF tensor ``t`` (``sl``: its safetensors slice), read shard by shard.

    Part ``part`` of a fused tensor is the slice ``[part * n, (part + 1) * n)`` of its split
    axis, so a shard of ``up_proj`` is read straight out of ``gate_up_proj``. ``replicas``:
    copies of each KV head (``t.kv_head_rows``) on the mesh.
    """
    shape = t.part_shape()

    def read(idx):
        if t.split_axis is not None:
            s, off = idx[t.split_axis], part * shape[t.split_axis]
            idx = idx[:t.split_axis] + (slice(s.start + off, s.stop + off),) \
                + idx[t.split_axis + 1:]
        return sl[idx]

    return _from_host(t.part_shape(replicas), sharding,
                      _from_replicated_rows(read, t.kv_head_rows, replicas))


def _read_stacked(slices, shape, sharding, *, scale: bool = False):
    """Per-expert tensors ``slices[e]`` (``[N, K]``, or scales ``[N, 1]``) as one
    ``[E, N, K]`` (``[E, N]``) array; each shard reads only its experts' rows."""
    def read(idx):
        rows = idx[1:] + ((slice(0, 1),) if scale else ())
        parts = [slices[e][rows] for e in range(idx[0].start, idx[0].stop)]
        out = np.stack(parts)
        return out[..., 0] if scale else out

    return _from_host(shape, sharding, read)


@functools.lru_cache(maxsize=None)
def _caster(dtype: str, sharding):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _converter(op: str, dtype, shardings):
    """Jitted conversions on the device (bf16 never leaves it):

    * "quantize": HF layout -> (FP8 weight K-major, f32 scales), per output channel.
    * "quantize_kmajor": the same from an already K-major ``[.., N, K]`` tensor.
    * "dequantize": (FP8 ``[.., N, K]``, scales) -> HF layout in ``dtype``.
    * "scale": a checkpoint's scales -> f32.
    * "to_hf": a K-major expert tensor -> HF's ``[E, K, N]`` in ``dtype``.
    """
    def kmajor(x, experts):
        return jnp.swapaxes(x, 1, 2) if experts else x

    if op in ("quantize", "quantize_kmajor"):
        def f(x, experts):
            return fp8_lib.quantize(kmajor(x, experts and op == "quantize"), -1)
    elif op == "dequantize":
        def f(q, s, experts):
            return kmajor(fp8_lib.dequantize(q, s, -1, dtype), experts)
    elif op == "scale":
        def f(s, experts):
            return s.astype(jnp.float32)
    else:  # to_hf
        def f(x, experts):
            return kmajor(x, experts).astype(dtype)
    return jax.jit(f, static_argnames="experts", out_shardings=shardings)


class _MappedSlice:
    """A float8_e4m3fn safetensors tensor read through a memory map.

    safetensors' numpy reader (0.8) cannot build float8 arrays (numpy has no such dtype;
    ml_dtypes supplies it), so FP8 tensors are mapped from the file directly: the format
    is an 8-byte header length, a JSON header with each tensor's byte range, then the
    data. Slicing reads only the slice's pages, as ``get_slice`` does.
    """

    def __init__(self, file: str, key: str):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(n))[key]
        start, _ = info["data_offsets"]
        self.shape = tuple(info["shape"])
        self.array = np.memmap(file, dtype=ml_dtypes.float8_e4m3fn, mode="r",
                               offset=8 + n + start, shape=self.shape)

    def get_shape(self):
        return list(self.shape)

    def __getitem__(self, idx):
        return np.ascontiguousarray(self.array[idx])


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


# Per-expert linears of an unfused checkpoint, per part of HF's fused tensor.
_EXPERT_LINEARS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a TensorMap's data is in a checkpoint: ``names[part]`` (one name, or one per
    expert for unfused experts), with ``scales[part]`` alongside when stored in FP8."""

    names: tuple[tuple[str, ...], ...]
    scales: tuple[tuple[str, ...], ...] | None
    per_expert: bool

    def all_names(self):
        for group in self.names + (self.scales or ()):
            yield from group


def _scale_name(name: str) -> str:
    return name[:-len("weight")] + "weight_scale"


def _source(t: TensorMap, available) -> _Source | None:
    """The checkpoint tensors that hold ``t`` (None: missing)."""
    if t.name in available:
        scale = _scale_name(t.name) if t.name.endswith(".weight") else None
        if scale is not None and scale in available:
            return _Source(((t.name,),) * len(t.targets), ((scale,),), False)
        return _Source(((t.name,),) * len(t.targets), None, False)
    if not t.experts:
        return None
    base, fused = t.name.rsplit(".", 1)
    e = t.shape[0]
    names = tuple(tuple(f"{base}.{i}.{lin}.weight" for i in range(e))
                  for lin in _EXPERT_LINEARS[fused])
    if not all(n in available for group in names for n in group):
        return None
    scales = tuple(tuple(_scale_name(n) for n in group) for group in names)
    have = [n in available for group in scales for n in group]
    if any(have) and not all(have):
        raise ValueError(f"{base}: some experts have weight_scale tensors and some do not")
    return _Source(names, scales if all(have) else None, True)


def _check_ignore(qc: quant_lib.CheckpointQuantization, sources, available) -> None:
    """A checkpoint's FP8 tensors must not belong to modules its ``ignore`` list names."""
    for src in sources:
        for group in src.scales or ():
            for scale in group:
                key = available[scale][0]
                module = key[:-len(".weight_scale")]
                if qc.ignored(module):
                    raise ValueError(f"checkpoint tensor {key} is quantised but its module is in "
                                     "quantization_config.ignore")


def load(path: str | os.PathLike, *, dtype=None, mesh=None,
         quantization: str | None = None) -> Llama4ForCausalLM:
    """A ``Llama4ForCausalLM`` or ``Llama4ForConditionalGeneration`` directory -> the text model.

    ``dtype``: cast every weight to it; None keeps each tensor's stored dtype (so ``save``
    writes back identical tensors). ``mesh``: a ``jax.sharding.Mesh`` with the axes of
    :mod:`jaxattn.parallel` (one replica: expert x tensor); each device receives only its
    shards, and the model runs per device on it (``model.mesh``). None puts all on the
    first device. ``quantization``: "fp8" quantises the scheme's layers while loading
    (:mod:`~jaxattn.models.llama4.quantization`); a compressed-tensors FP8 checkpoint loads
    in FP8 either way. Raises ValueError naming missing, unexpected or mis-shaped tensors,
    or an unsupported quantisation.
    """
    path = os.fspath(path)
    config = Llama4Config.from_pretrained(path)
    checkpoint_q = quant_lib.checkpoint_scheme(path)
    fp8 = quant_lib.scheme(quantization) or (Fp8Scheme() if checkpoint_q else None)
    tmap = tensor_map(config, fp8)
    available = _text_names(_checkpoint_index(path))
    sources = {t.name: _source(t, available) for t in tmap}
    missing = {t.name for t in tmap if sources[t.name] is None}
    used = {n for src in sources.values() if src is not None for n in src.all_names()}
    unexpected = available.keys() - used
    if config.tie_word_embeddings:
        unexpected.discard("lm_head.weight")  # HF ignores a stored copy of a tied head
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the config: "
                         + (f"missing tensors: {_listing(missing)}. " if missing else "")
                         + (f"unexpected tensors: {_listing(unexpected)}." if unexpected else ""))
    if any(src.scales for src in sources.values()) and checkpoint_q is None:
        raise ValueError(f"checkpoint {path} holds weight_scale tensors but its config.json has "
                         "no quantization_config")
    if checkpoint_q is not None:
        _check_ignore(checkpoint_q, sources.values(), available)

    from jaxattn.models.llama4 import sharding as sharding_lib

    if mesh is not None:
        sharding_lib.check(config, mesh)
    replicas = kv_replicas(config, sharding_lib.group_size(mesh))
    target_dtype = None if dtype is None else jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: Llama4ForCausalLM(
        config, dtype=target_dtype or jnp.float32, rngs=nnx.Rngs(0), fp8=fp8))

    def place(spec, shape, name):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(mesh, sharding_lib.resolve(spec, shape, mesh, name=name))

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def tensor(name):
            """The safetensors slice of checkpoint tensor ``name`` (files opened once)."""
            key, file = available[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "np"))
            sl = handles[file].get_slice(key)
            if sl.get_dtype() == "F8_E4M3":
                sl = _MappedSlice(file, key)
            return sl, key, file

        for t in tmap:
            src = sources[t.name]
            for part in range(len(t.targets)):
                params = t.params(part, replicas)
                shardings = tuple(place(p.spec, p.shape, t.name) for p in params)
                for p, value in zip(params, _load_part(t, part, src, tensor, shardings,
                                                       target_dtype, place, replicas)):
                    _variable(model, p.path).set_value(value)
    model.mesh = mesh
    return model


def _load_part(t: TensorMap, part: int, src: _Source, tensor, shardings, dtype, place,
               replicas: int = 1):
    """The device value(s) of target ``part`` of ``t``: the weight, and its scale when FP8
    (``replicas``: copies of each KV head, for the k/v projections)."""
    hf_shape = t.part_shape(replicas)
    hf_sharding = place(t.specs[part], hf_shape, t.name)
    experts = t.experts
    if not src.per_expert:
        sl, key, file = tensor(src.names[part][0])
        if tuple(sl.get_shape()) != t.shape:
            raise ValueError(f"tensor {key} in {file} has shape {tuple(sl.get_shape())}, "
                             f"expected {t.shape}")
        if src.scales is None:  # an unquantised tensor in HF's layout
            x = _read_part(sl, t, part, hf_sharding, replicas)
            if t.fp8:
                return _converter("quantize", None, shardings)(x, experts=experts)
            if dtype is not None and x.dtype != dtype:  # cast on the device
                x = _caster(dtype.name, hf_sharding)(x)
            return (x,)
        # A compressed-tensors linear: [out, in] float8 and [out, 1] scales.
        ssl, skey, _ = tensor(src.scales[0][0])
        if tuple(ssl.get_shape()) not in ((t.shape[0], 1), (t.shape[0],)):
            raise ValueError(f"tensor {skey} has shape {tuple(ssl.get_shape())}, expected "
                             f"({t.shape[0]}, 1)")
        out = hf_shape[0]
        scale_sharding = place(P(_axis(t.specs[part], 0)), (out,), t.name)
        q = _read_part(sl, t, part, hf_sharding, replicas)
        two_d = len(ssl.get_shape()) == 2
        s = _from_host((out,), scale_sharding, _from_replicated_rows(
            lambda idx: ssl[idx + (slice(0, 1),)][:, 0] if two_d else ssl[idx],
            t.kv_head_rows, replicas))
        if t.fp8:
            return (q, _converter("scale", None, shardings[1])(s, experts=False))
        return (_converter("dequantize", dtype or jnp.dtype(jnp.bfloat16), shardings[0])(
            q, s, experts=False),)
    # Unfused experts: one [N, K] linear per expert, stacked K-major.
    names = src.names[part]
    slices = []
    e, k, n = hf_shape
    for name in names:
        sl, key, file = tensor(name)
        if tuple(sl.get_shape()) != (n, k):
            raise ValueError(f"tensor {key} in {file} has shape {tuple(sl.get_shape())}, "
                             f"expected {(n, k)}")
        slices.append(sl)
    spec = t.specs[part]
    kspec = P(_axis(spec, 0), _axis(spec, 2), _axis(spec, 1))
    w = _read_stacked(slices, (e, n, k), place(kspec, (e, n, k), t.name))
    if src.scales is None:
        if t.fp8:
            return _converter("quantize_kmajor", None, shardings)(w, experts=True)
        return (_converter("to_hf", dtype or w.dtype, shardings[0])(w, experts=True),)
    scale_slices = []
    for name in src.scales[part]:
        sl, key, _ = tensor(name)
        if tuple(sl.get_shape()) != (n, 1):
            raise ValueError(f"tensor {key} has shape {tuple(sl.get_shape())}, expected {(n, 1)}")
        scale_slices.append(sl)
    s = _read_stacked(scale_slices, (e, n), place(P(_axis(spec, 0), _axis(spec, 2)), (e, n),
                                                  t.name), scale=True)
    if t.fp8:
        return (w, _converter("scale", None, shardings[1])(s, experts=True))
    return (_converter("dequantize", dtype or jnp.dtype(jnp.bfloat16), shardings[0])(
        w, s, experts=True),)


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
    if getattr(model, "fp8", None) is not None:
        raise ValueError("save writes unquantised checkpoints; this model holds FP8 weights")
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
            if t.kv_head_rows and parts[0].shape[0] != t.shape[0]:  # KV heads replicated
                parts = [unreplicated_rows(parts[0], t.kv_head_rows,
                                           parts[0].shape[0] // t.shape[0])]
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
