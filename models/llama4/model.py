"""The Llama 4 text decoder in Flax NNX and its two forwards.

* ``model(input_ids[B, L])``: the full-sequence forward (research use and the
  parity tests), attention through :func:`jaxattn.attention`.
* ``make_step_fn(model, bounds)``: the serving forward over a packed ragged
  :class:`~jaxattn.batch.StepBatch` and the paged KV cache, attention through
  :func:`jaxattn.ragged_paged_attention`; jitted with static bounds and the
  cache donated.

Both run the same layer code; only the attention call differs. The
computation follows transformers 5.17's ``modeling_llama4.py`` step by step
(the comments name the HF quirks it reproduces).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxattn
from jaxattn import cache as kv_cache_lib
from jaxattn import scheduler
from jaxattn import batch as batch_lib
from jaxattn.batch import StepBatch
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.moe import MLP, NO_AXES, Axes, Linear, MoE, _normal


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), dtype))

    def __call__(self, x):
        # HF normalises in f32, casts back to the input dtype, *then* multiplies by the weight.
        return _l2norm(x, self.eps) * self.weight[...]


def _l2norm(x, eps):
    """HF's ``Llama4TextL2Norm`` (and the weightless part of RMSNorm): x * rsqrt(mean(x^2) + eps)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope_tables(config: Llama4Config, positions):
    """cos, sin [..., head_dim/2] (f32) for integer positions [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(config.inv_freq())
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x, cos, sin):
    """HF's complex rotation: element pairs (2j, 2j+1) are (real, imag) and rotate by position.

    x [..., P, H, D] with cos/sin [..., P, D/2]. Interleaved pairs, not the
    half-split (rotate_half) convention of Llama 2/3.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[..., None, :], sin[..., None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, d)
        kw = dict(bias=config.attention_bias, dtype=dtype, std=config.initializer_range, rngs=rngs)
        self.q_proj = Linear(h, self.num_heads * d, **kw)
        self.k_proj = Linear(h, self.num_kv_heads * d, **kw)
        self.v_proj = Linear(h, self.num_kv_heads * d, **kw)
        self.o_proj = Linear(self.num_heads * d, h, **kw)
        self.use_rope = config.use_rope(layer)
        self.qk_norm_eps = config.rms_norm_eps if (config.use_qk_norm and self.use_rope) else None
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        self.chunk_size = config.layer_chunk_size(layer)  # None: global attention
        self.scale = d ** -0.5

    def qkv(self, x, positions, rope):
        """x [..., P, hidden] -> q [..., P, Hq, D], k, v [..., P, Hkv, D]; positions [P]."""
        lead = x.shape[:-1]
        # -1: under tensor parallelism the projections hold this device's heads only.
        q = self.q_proj(x).reshape(*lead, -1, self.head_dim)
        k = self.k_proj(x).reshape(*lead, -1, self.head_dim)
        v = self.v_proj(x).reshape(*lead, -1, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.qk_norm_eps is not None:  # after RoPE, RoPE layers only (HF)
            q, k = _l2norm(q, self.qk_norm_eps), _l2norm(k, self.qk_norm_eps)
        if self.temperature_tuning:
            # NoPE layers scale queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
            pos = positions.astype(jnp.float32)
            t = jnp.log1p(jnp.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * t[..., None, None]).astype(q.dtype)
        return q, k, v

    def out(self, o, axes: Axes):
        """Row-parallel output projection: each device's heads give a partial sum, reduced here."""
        return self.o_proj(o.reshape(*o.shape[:-2], -1), reduce=axes.psum)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(config, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.feed_forward = (MoE(config, dtype=dtype, rngs=rngs) if config.is_moe(layer) else
                             MLP(config, config.intermediate_size_mlp, dtype=dtype, rngs=rngs))

    def __call__(self, x, positions, rope, attend, axes: Axes, valid=None):
        """``attend(attn_module, q, k, v) -> o`` is the one part the two forwards do differently.
        ``valid`` (bool [T], serving): which rows are tokens, not bucket padding.

        Under a mesh ``x`` is replicated over the model-parallel group: each device
        computes its heads / columns / experts and one all-reduce per block
        (``axes.psum``) restores the full activation.
        """
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions, rope)
        x = x + self.self_attn.out(attend(self.self_attn, q, k, v), axes)
        h = self.post_attention_layernorm(x)
        ff = self.feed_forward
        return x + axes.psum(ff(h, axes, valid) if isinstance(ff, MoE) else ff(h, axes))


class Embedding(nnx.Module):
    def __init__(self, vocab: int, size: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab, size), std, dtype))  # [vocab, hidden]


class Llama4TextModel(nnx.Module):
    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      std=config.initializer_range, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class Llama4ForCausalLM(nnx.Module):
    """Attribute paths mirror HF's parameter names (``model.layers.3.self_attn.q_proj.weight``)."""

    def __init__(self, config: Llama4Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.mesh = None  # a jax.sharding.Mesh once the weights are placed on one
        self.model = Llama4TextModel(config, dtype=dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, dtype=dtype, std=config.initializer_range,
            rngs=rngs)

    @property
    def dtype(self):
        return self.model.embed_tokens.weight[...].dtype

    def _embed(self, ids, axes: Axes):
        """Token embeddings [..., hidden]. Vocab-parallel under a mesh: each device holds a
        contiguous block of rows, looks up the ids that fall in it (zeros elsewhere) and
        the group sums (one id hits exactly one block, so the sum is exact)."""
        w = self.model.embed_tokens.weight[...]
        if not axes.vocab:
            return w[ids]
        rows = w.shape[0]
        local = ids - jax.lax.axis_index(axes.vocab) * rows
        mine = (local >= 0) & (local < rows)
        x = jnp.where(mine[..., None], w[jnp.clip(local, 0, rows - 1)], jnp.zeros((), w.dtype))
        return jax.lax.psum(x, axes.vocab)

    def _logits(self, x, axes: Axes = NO_AXES):
        """Final norm and LM head; f32 logits (the head accumulates in f32). Vocab-parallel
        under a mesh: each device's block of logits, gathered (only the rows asked for)."""
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight[...] if self.lm_head is None else self.lm_head.weight[...]
        logits = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        if axes.vocab:
            logits = jax.lax.all_gather(logits, axes.vocab, axis=logits.ndim - 1, tiled=True)
        return logits

    def _layers(self, x, positions, attend, axes: Axes = NO_AXES, valid=None):
        rope = rope_tables(self.config, positions)
        for layer in self.model.layers:
            x = layer(x, positions, rope, attend, axes, valid)
        return x

    # Full-sequence forward ------------------------------------------------------------
    def forward(self, input_ids, *, impl: str = "auto", axes: Axes = NO_AXES):
        """input_ids [B, L] int32 -> logits [B, L, vocab] f32 (causal, positions 0..L-1).

        ``axes``: the mesh axes when called on a device's shards inside ``shard_map``.
        """
        x = self._embed(input_ids, axes)  # [B, L, hidden]
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)

        def attend(attn: Attention, q, k, v):
            return jaxattn.attention(q, k, v, causal=True, chunk_size=attn.chunk_size,
                                     scale=attn.scale, impl=impl)

        return self._logits(self._layers(x, positions, attend, axes), axes)

    def __call__(self, input_ids, *, impl: str = "auto"):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if self.mesh is not None:  # weights placed on a mesh (``load(mesh=)``, ``sharding.shard``)
            from jaxattn.models.llama4 import sharding

            return sharding.forward(self, input_ids, impl)
        return _forward_jit(self, input_ids, impl)

    # Serving forward -------------------------------------------------------------------
    def plans(self, bounds: jaxattn.Bounds, batch: StepBatch) -> tuple:
        """The work plans of one step, one per attention kind in :func:`plan_kinds` order.

        Built once per step (outside any ``shard_map``: the same replicated plan feeds
        every device, whose bounds count its local heads) and shared by every layer.
        """
        return tuple(scheduler.plan(bounds, batch.cu_q_lens, batch.kv_lens, batch.num_seqs,
                                    chunk_size=c) for c in plan_kinds(self.config))

    def step(self, kv_cache: kv_cache_lib.KVCache, batch: StepBatch, *, bounds: jaxattn.Bounds,
             impl: str = "auto", plans: tuple | None = None, axes: Axes = NO_AXES):
        """One engine step: new tokens of a packed batch through all layers over the paged cache.

        Returns (logits [S, vocab] f32 at ``batch.logits_indices``, updated cache).
        ``plans`` (from :meth:`plans`; built here if None) are shared by every layer of
        their kind. Inside ``shard_map`` the cache and weights are this device's
        shards, ``bounds`` count its local heads and ``axes`` name the mesh axes.
        """
        cu, kv_lens, num_seqs = batch.cu_q_lens, batch.kv_lens, batch.num_seqs
        plans = dict(zip(plan_kinds(self.config),
                         self.plans(bounds, batch) if plans is None else plans))
        new_k, new_v = [], []

        def attend(attn: Attention, q, k, v):
            i = len(new_k)
            k_pages, v_pages = kv_cache_lib.write(kv_cache.k[i], kv_cache.v[i], k, v, batch.slots)
            new_k.append(k_pages)
            new_v.append(v_pages)
            return _paged_attention(q, k_pages, v_pages, batch.page_table, cu, kv_lens, num_seqs,
                                    plans[attn.chunk_size], bounds=bounds, scale=attn.scale,
                                    chunk_size=attn.chunk_size, impl=impl)

        x = self._embed(batch.token_ids, axes)  # [T, hidden]
        valid = jnp.arange(x.shape[0]) < cu[num_seqs]  # [T]: not bucket padding
        x = self._layers(x, batch.positions, attend, axes, valid)
        logits = self._logits(x[batch.logits_indices], axes)  # [S, vocab]
        return logits, kv_cache_lib.KVCache(k=tuple(new_k), v=tuple(new_v))


@functools.partial(jax.jit, static_argnames=("bounds", "scale", "chunk_size", "impl"))
def _paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, plan, *,
                     bounds, scale, chunk_size, impl):
    """One layer's attention, as a jitted function so that layers of one kind share it.

    Every chunked-local layer (and every global layer) calls this with the same shapes and
    static arguments, so JAX traces and lowers the kernels once per kind and the module
    calls that one function 48 times, instead of lowering (and embedding) a copy of each
    Mosaic kernel per layer: the step's compile time then barely grows with depth.
    """
    return jaxattn.ragged_paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens,
                                          num_seqs, bounds=bounds, scale=scale,
                                          chunk_size=chunk_size, impl=impl, plan=plan)


def plan_kinds(config: Llama4Config) -> tuple:
    """The attention kinds of the model's layers: None (global) first, then the chunk size."""
    chunks = {config.layer_chunk_size(i) for i in range(config.num_hidden_layers)}
    return tuple(sorted(chunks, key=lambda c: -1 if c is None else c))


@functools.partial(nnx.jit, static_argnums=(2,))
def _forward_jit(model, input_ids, impl):
    return model.forward(input_ids, impl=impl)


def init_random(config: Llama4Config, *, seed: int = 0, dtype=jnp.float32) -> Llama4ForCausalLM:
    """Seeded random weights (HF's init: normal(0, initializer_range), norms at 1)."""
    return Llama4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


def _default_block_kv(chunk_size: int | None, page_size: int) -> int:
    """The largest KV tile of whole pages, up to 128 keys, that divides the chunk (Bounds' rules)."""
    for pages in range(max(1, 128 // page_size), 0, -1):
        if chunk_size is None or chunk_size % (pages * page_size) == 0:
            return pages * page_size
    raise ValueError(f"attention_chunk_size={chunk_size} is not a multiple of page_size={page_size}")


def bounds_for(config: Llama4Config, *, max_num_seqs: int, max_num_batched_tokens: int,
               max_model_len: int, page_size: int, model_parallel: int = 1,
               **kw) -> jaxattn.Bounds:
    """The engine's static :class:`jaxattn.Bounds` for this model (heads, head_dim, chunk size).

    ``model_parallel``: devices the attention heads are split over (tensor x expert
    parallel); the bounds then count one device's heads, which is what its kernels
    see inside ``shard_map``. ``kw`` passes tuning fields through (block_q, block_kv,
    decode_q, ...).
    """
    hq, hkv = local_heads(config, model_parallel)
    chunked = any(config.is_chunked(i) for i in range(config.num_hidden_layers))
    chunk = config.attention_chunk_size if chunked else None
    kw.setdefault("block_kv", _default_block_kv(chunk, page_size))
    return jaxattn.Bounds(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, page_size=page_size, num_q_heads=hq,
                          num_kv_heads=hkv, head_dim=config.head_dim, chunk_size=chunk, **kw)


def local_heads(config: Llama4Config, model_parallel: int = 1) -> tuple[int, int]:
    """(query heads, KV heads) of one device when heads are split ``model_parallel`` ways."""
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hkv % model_parallel:
        raise ValueError(f"tensor x expert parallel size {model_parallel} must divide the "
                         f"{hkv} KV heads (attention is split by KV head)")
    return hq // model_parallel, hkv // model_parallel


def cache_spec(config: Llama4Config, *, num_pages: int, page_size: int,
               dtype=jnp.bfloat16, model_parallel: int = 1) -> kv_cache_lib.CacheSpec:
    """One K and one V pool per layer; chunked-local layers keep their full KV too (they share
    the page table with the global layers). ``model_parallel``: devices the KV heads are
    split over (the spec's byte counts are then per device)."""
    local_heads(config, model_parallel)
    return kv_cache_lib.CacheSpec(num_layers=config.num_hidden_layers, num_pages=num_pages,
                                  page_size=page_size, num_kv_heads=config.num_key_value_heads,
                                  head_dim=config.head_dim, dtype=jnp.dtype(dtype).name,
                                  shards=model_parallel)


def step_compiler_options() -> dict | None:
    """XLA options for the step on a GPU: run it as CUDA graphs, the Mosaic kernels included.

    A decode step launches ~50 kernels per layer; one by one, the launches cost more than
    the kernels at small batches. XLA's default command buffers leave custom calls (our
    kernels) out and so cut the step into short graphs. What matters is the host's time
    per step, which async scheduling hides only while it is shorter than the device's.
    Measured on an H100, Scout-width 4 layers, batch 1 decode over 8k tokens (2.05 ms
    of kernels): the host dispatches a step in 1.8 ms with these options, 2.6 ms without
    graphs, and steps enqueued back to back take 2.13 vs 2.64 ms (a jax.profiler
    timeline). Synchronous single steps barely differ (benchmarks/results/model-*.md:
    "XLA options" table).
    """
    if jax.default_backend() != "gpu":
        return None
    return {"xla_gpu_enable_command_buffer":
            "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION",
            "xla_gpu_graph_min_graph_size": 1}


def make_step_fn(model: Llama4ForCausalLM, bounds: jaxattn.Bounds, *, impl: str = "auto",
                 compiler_options: dict | None = None):
    """``step(kv_cache, batch, prev_tokens=None) -> (logits [S, vocab] f32, new kv_cache)``, jitted.

    Shapes depend only on ``bounds`` and the batch's token count T, so it
    compiles once per T and never for a new mix of lengths. The cache is
    donated (updated in place on GPU). The weights are those of ``model`` now.
    ``step.jitted`` is the underlying jitted function (for compile counting); it takes the
    batch packed into one int32 vector (``jaxattn.batch.pack``): one host-to-device copy.
    ``compiler_options``: XLA options for the step (None: :func:`step_compiler_options`).

    ``prev_tokens`` (int32 [S], on the device) lets a step start before the previous
    one's sampled tokens reach the host: a batch token id ``-(r + 1)`` stands for
    ``prev_tokens[r]`` (the engine's async scheduling passes the last step's draws).

    With the weights on a mesh (``model.mesh``), the layers run per device inside
    ``shard_map`` on local heads and experts (the attention kernels are custom calls
    that XLA cannot partition), the cache is split by KV head, and ``bounds`` must
    count one device's heads (``bounds_for(..., model_parallel=)``). The plans are
    built once, before the ``shard_map``, and every device reads the same ones.
    """
    graphdef, state = nnx.split(model)

    def local_step(state, kv_cache, batch, plans, axes=NO_AXES):
        return nnx.merge(graphdef, state).step(kv_cache, batch, bounds=bounds, impl=impl,
                                               plans=plans, axes=axes)

    mesh = model.mesh
    if mesh is not None:
        from jaxattn.models.llama4 import sharding

        local_step = sharding.shard_step(model, state, bounds, local_step)

    if compiler_options is None:
        compiler_options = step_compiler_options()

    @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("num_tokens",),
                       compiler_options=compiler_options or None)
    def jitted(state, kv_cache, packed, prev_tokens, num_tokens):
        # packed: batch_lib.pack(StepBatch); prev_tokens: int32 [S]
        batch = batch_lib.unpack(packed, bounds, num_tokens)
        ids = batch.token_ids
        batch = batch._replace(token_ids=jnp.where(
            ids < 0, prev_tokens[jnp.clip(-ids - 1, 0, prev_tokens.shape[0] - 1)], ids))
        return local_step(state, kv_cache, batch, nnx.merge(graphdef, state).plans(bounds, batch))

    device = jax.devices()[0]
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    multi_process = jax.process_count() > 1
    zeros = np.zeros(bounds.max_num_seqs, np.int32)  # prev_tokens of a step that needs none
    no_prev = (jax.make_array_from_callback(zeros.shape, replicated, lambda i: zeros[i])
               if multi_process else jax.device_put(zeros, replicated or device))

    def step(kv_cache: kv_cache_lib.KVCache, batch: StepBatch, prev_tokens=None):
        # An uncommitted pool (e.g. fresh from a jit without out_shardings) has another
        # cache key than the committed pools a step returns: commit it (no copy) so the
        # first step does not compile a second time.
        if mesh is None and not all(x.committed for x in kv_cache.k + kv_cache.v):
            kv_cache = jax.tree.map(
                lambda x: x if x.committed else jax.device_put(x, device), kv_cache)
        # Host numpy goes to jit as is: jit's own transfer measured ~50 us cheaper than a
        # device_put first (H100 machine, a 3000-int vector: 124 vs 175 us to a result).
        packed = batch_lib.pack(batch)
        if multi_process and not isinstance(packed, jax.Array):
            # Every process passes the same host batch; each puts its devices' copies.
            packed = jax.make_array_from_callback(packed.shape, replicated, lambda i: packed[i])
        elif replicated is not None:
            packed = jax.device_put(packed, replicated)
        if prev_tokens is None:
            if isinstance(batch.token_ids, np.ndarray) and batch.token_ids.min(initial=0) < 0:
                raise ValueError("the batch takes tokens from a previous step (negative ids) "
                                 "but no prev_tokens were given")
            prev_tokens = no_prev
        return jitted(state, kv_cache, packed, prev_tokens, num_tokens=len(batch.token_ids))

    step.jitted = jitted
    return step
