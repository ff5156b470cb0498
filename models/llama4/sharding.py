"""Llama 4 on a device mesh: where each parameter lives and the per-device forwards.

Layout (mesh axes from :mod:`jaxattn.parallel`; ``MODEL`` = expert x tensor):

=====================================  ===========================================
q/k/v_proj ``[heads*D, H]``            rows (heads) over ``MODEL``: column parallel
o_proj ``[H, heads*D]``                columns over ``MODEL``: row parallel, psum
dense MLP, shared expert               gate/up rows, down columns over ``MODEL``
routed experts ``[E, H, I]``           E over ``expert``, I over ``tensor``
router, norms                          replicated (small)
embed_tokens, lm_head ``[V, H]``       rows (vocabulary) over ``MODEL`` when V divides
KV pools ``[pages, page, Hkv, D]``     KV heads over ``MODEL``
=====================================  ===========================================

A group larger than the KV heads (a multiple of them) replicates each KV head on the
``n / Hkv`` devices whose query heads read it, as vLLM does: the K/V projections (and
the pools' head axis) then hold ``n`` heads on the mesh, head ``i`` a copy of KV head
``i // (n / Hkv)``, split one per device like any other rows (``spec_table``; the loader
reads each device's rows from its KV head's, ``save`` writes one copy back).

The layer code runs per device inside ``shard_map`` (the Mosaic attention and
grouped-matmul kernels are custom calls XLA cannot partition), on its local
heads / columns / experts, with one all-reduce after attention and one after
the feed-forward block (see ``DecoderLayer``). The specs come from the loader's
table (:func:`jaxattn.models.llama4.loader.tensor_map`), the one place that
says where each tensor goes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn import parallel
from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.loader import replicated_rows, tensor_map
from jaxattn.models.llama4.layers import Axes
from jaxattn.models.llama4.model import Llama4ForCausalLM, kv_replicas
from jaxattn.models.llama4.quantization import Fp8Scheme

# Embedding / LM head rows: split over the group only when the vocabulary divides.
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def group_size(mesh: Mesh | None) -> int:
    """Devices of the model-parallel group (the ways heads are split)."""
    return parallel.axis_size(mesh, parallel.MODEL)


def parallel_config(mesh: Mesh | None) -> parallel.ParallelConfig:
    """The tensor / expert sizes of a replica mesh (None: one device)."""
    if mesh is None:
        return parallel.ParallelConfig()
    return parallel.ParallelConfig(tensor=parallel.axis_size(mesh, parallel.TENSOR),
                                   expert=parallel.axis_size(mesh, parallel.EXPERT))


def vocab_parallel(config: Llama4Config, mesh: Mesh | None) -> bool:
    n = group_size(mesh)
    return n > 1 and config.vocab_size % n == 0


def axes_for(config: Llama4Config, mesh: Mesh | None) -> Axes:
    """The static :class:`Axes` the layer code reduces over on this mesh. Axes of size 1
    are left out: a reduction over them is nothing, and the layer code keeps work on one
    device that a reduction would need done first (the FP8 epilogues, see
    ``DecoderLayer``)."""
    if mesh is None:
        return Axes()
    model = tuple(a for a in parallel.model_axes(mesh) if mesh.shape[a] > 1)
    expert = tuple(a for a in (parallel.EXPERT,) if a in model)
    return Axes(model=model, expert=expert,
                vocab=model if vocab_parallel(config, mesh) else ())


def check(config: Llama4Config, mesh: Mesh) -> None:
    """ValueError naming the flag when the model cannot be split this way."""
    tp = parallel.axis_size(mesh, parallel.TENSOR)
    ep = parallel.axis_size(mesh, parallel.EXPERT)
    n = tp * ep
    if parallel.axis_size(mesh, parallel.DATA) > 1:
        raise ValueError("a model step runs on one data-parallel replica: pass one of "
                         "parallel.replica_meshes(mesh)")
    flags = f"--tensor-parallel-size {tp} x --expert-parallel-size {ep} = {n}"
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % n or (hkv % n and n % hkv):
        raise ValueError(f"{flags} must divide num_key_value_heads={hkv} or be a multiple of it "
                         f"(attention and the KV cache are split by KV head; past {hkv} devices "
                         f"each KV head is replicated), and divide num_attention_heads={hq}")
    if config.moe_layers and config.num_local_experts % ep:
        raise ValueError(f"--expert-parallel-size {ep} must divide num_local_experts="
                         f"{config.num_local_experts}")
    if config.moe_layers and config.intermediate_size % n:
        raise ValueError(f"{flags} must divide intermediate_size={config.intermediate_size} "
                         "(expert and shared-expert columns)")
    dense = any(not config.is_moe(i) for i in range(config.num_hidden_layers))
    if dense and config.intermediate_size_mlp % n:
        raise ValueError(f"{flags} must divide intermediate_size_mlp="
                         f"{config.intermediate_size_mlp} (dense MLP columns)")


def resolve(spec: P, shape, mesh: Mesh | None, *, name: str = "tensor") -> P:
    """A table spec on this mesh: axes the mesh lacks or of size 1 dropped, divisibility checked."""
    if mesh is None:
        return P()
    out = []
    for dim, entry in enumerate(spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
        if shape[dim] % n:
            raise ValueError(f"{name}: dimension {dim} ({shape[dim]}) does not split over "
                             f"mesh axes {names} ({n} devices)")
        out.append(None if not names else names[0] if len(names) == 1 else names)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


@functools.lru_cache(maxsize=16)
def spec_table(config: Llama4Config, mesh: Mesh | None,
               fp8: Fp8Scheme | None = None) -> dict[tuple, tuple[P, tuple]]:
    """Model attribute path -> (PartitionSpec on this mesh, global shape), every parameter
    (``fp8``: the model's FP8 scheme; its weights are K-major, each with a scale)."""
    out = {}
    vocab = vocab_parallel(config, mesh)
    replicas = kv_replicas(config, group_size(mesh))  # each KV head once per device reading it
    for t in tensor_map(config, fp8):
        for part in range(len(t.targets)):
            for p in t.params(part, replicas):
                spec = P() if t.name in VOCAB_TENSORS and not vocab else p.spec
                out[p.path] = (resolve(spec, p.shape, mesh, name=t.name), p.shape)
    return out


def _attr_path(path) -> tuple:
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            keys.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
    return tuple(keys[:-1]) if keys and keys[-1] == "value" else tuple(keys)


def state_specs(state, config: Llama4Config, mesh: Mesh | None, fp8: Fp8Scheme | None = None):
    """A tree like ``state`` (from ``nnx.split``) with each parameter's PartitionSpec."""
    table = spec_table(config, mesh, fp8)

    def spec(path, _):
        key = _attr_path(path)
        if key not in table:
            raise KeyError(f"parameter {'.'.join(map(str, key))} has no entry in tensor_map")
        return table[key][0]

    return jax.tree_util.tree_map_with_path(spec, state)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """KV pools ``[num_pages, page_size, Hkv, D]``: KV heads over the model-parallel group."""
    axes = tuple(a for a in parallel.model_axes(mesh) if mesh.shape[a] > 1)
    # No trailing None: a step returns the pools with the normalised spec, and an equal but
    # differently spelled input spec would be another compile-cache key (a second compile).
    return NamedSharding(mesh, P(None, None, axes) if axes else P())


def kv_scale_sharding(mesh: Mesh) -> NamedSharding:
    """FP8 KV scale pools ``[num_pages, Hkv, page_size]``: KV heads as :func:`kv_sharding`."""
    axes = tuple(a for a in parallel.model_axes(mesh) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(None, axes) if axes else P())


def shard(model: Llama4ForCausalLM, mesh: Mesh) -> Llama4ForCausalLM:
    """Place an existing model's parameters on ``mesh`` (tests, small models); returns it."""
    check(model.config, mesh)
    graphdef, state = nnx.split(model)
    table = spec_table(model.config, mesh, model.fp8)

    def place(path, x):
        key = _attr_path(path)
        if key not in table:
            raise KeyError(f"parameter {'.'.join(map(str, key))} has no entry in tensor_map")
        spec, shape = table[key]
        if x.shape != shape:  # K/V projections (and scales) with their KV heads replicated
            x = replicated_rows(x, model.config.head_dim, shape[0] // x.shape[0])
        return jax.device_put(x, NamedSharding(mesh, spec))

    state = jax.tree_util.tree_map_with_path(place, state)
    nnx.update(model, state)
    model.mesh = mesh
    return model


def init_random(config: Llama4Config, mesh: Mesh, *, seed: int = 0,
                dtype=jnp.bfloat16, fp8: Fp8Scheme | None = None) -> Llama4ForCausalLM:
    """Random weights generated on the devices, each device drawing only its shards.

    For models too large for one host or device (the full-size Scout benchmark).
    Norm weights are ones, biases zeros, the rest normal(0, initializer_range), as
    ``init_random``; the values differ from it (another key per parameter). ``fp8``: the
    scheme's weights are drawn one parameter at a time and quantised on the device (the
    unquantised model never exists at once, on the host or the devices).
    """
    check(config, mesh)
    abstract = nnx.eval_shape(lambda: Llama4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0),
                                                        fp8=fp8))
    graphdef, state = nnx.split(abstract)
    table = spec_table(config, mesh, fp8)
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))
    std = float(config.initializer_range)
    scales = {}  # scale path -> the scales drawn with its FP8 weight

    def scale_path(attr):
        return attr[:-1] + ("weight_scale",) if attr[-1] == "weight" else \
            attr[:-1] + (attr[-1] + "_scale",)

    def draw_fp8(path, leaf):
        attr = _attr_path(path)
        if leaf.dtype != jnp.float8_e4m3fn:
            return leaf
        s_attr = scale_path(attr)
        spec, shape = table[attr]
        q, s = _random_fp8(tuple(leaf.shape), std, NamedSharding(mesh, spec),
                           NamedSharding(mesh, table[s_attr][0]), shape[0] // leaf.shape[0],
                           config.head_dim)(jax.random.fold_in(key, next(counter)))
        jax.block_until_ready(q)  # one f32 draw on the device at a time
        scales[s_attr] = s
        return q

    def make(path, leaf):
        attr = _attr_path(path)
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf  # drawn by draw_fp8
        if attr in scales:
            return scales.pop(attr)
        spec, shape = table[attr]
        kind = ("ones" if any(str(a).endswith("norm") for a in attr) else
                "zeros" if attr[-1] == "bias" else "normal")
        # Replicated KV heads are drawn once and copied, so the replicas agree.
        return _random(kind, tuple(leaf.shape), jnp.dtype(leaf.dtype).name, std,
                       NamedSharding(mesh, spec), shape[0] // leaf.shape[0], config.head_dim)(
            jax.random.fold_in(key, next(counter)))

    state = jax.tree_util.tree_map_with_path(draw_fp8, state)
    state = jax.tree_util.tree_map_with_path(make, state)
    model = nnx.merge(graphdef, state)
    model.mesh = mesh
    return model


@functools.lru_cache(maxsize=None)
def _random(kind, shape, dtype, std, sharding, replicas=1, head_rows=1):
    """``replicas`` > 1: ``shape`` is KV heads of ``head_rows`` rows, each copied that often."""
    def make(key):
        if kind == "ones":
            x = jnp.ones(shape, dtype)
        elif kind == "zeros":
            x = jnp.zeros(shape, dtype)
        else:
            x = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return replicated_rows(x, head_rows, replicas)

    return jax.jit(make, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _random_fp8(shape, std, sharding, scale_sharding, replicas=1, head_rows=1):
    """normal(0, std) drawn in bf16 (the dtype a checkpoint would hold), quantised per
    output channel (the last axis is K: the weights are K-major); KV heads copied as in
    :func:`_random`."""
    def make(key):
        w = (std * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)
        q, s = fp8_lib.quantize(w, -1)
        return replicated_rows(q, head_rows, replicas), replicated_rows(s, head_rows, replicas)

    return jax.jit(make, out_shardings=(sharding, scale_sharding))


_FORWARDS: dict = {}


def forward(model: Llama4ForCausalLM, input_ids, impl: str, gmm_impl: str):
    """The full-sequence forward of a model on a mesh (``model(input_ids)`` calls this)."""
    graphdef, state = nnx.split(model)
    fn = _FORWARDS.get((graphdef, impl, gmm_impl))
    if fn is None:
        axes = axes_for(model.config, model.mesh)

        def local(state, ids):
            return nnx.merge(graphdef, state).forward(ids, impl=impl, gmm_impl=gmm_impl, axes=axes)

        fn = jax.jit(jax.shard_map(
            local, mesh=model.mesh, in_specs=(state_specs(state, model.config, model.mesh, model.fp8), P()),
            out_specs=P(), check_vma=False))
        if len(_FORWARDS) > 8:
            _FORWARDS.clear()
        _FORWARDS[(graphdef, impl, gmm_impl)] = fn
    return fn(state, input_ids)
