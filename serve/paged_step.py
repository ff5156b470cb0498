"""The serving forward of Llama 4: one jitted step over a packed batch and the paged KV cache.

:func:`make_step_fn` builds ``step(kv_cache, batch, prev_tokens) -> (logits, kv_cache)``:
the batch's new tokens (prefill chunks and decode tokens mixed, :mod:`jaxattn.serve.batch`)
go through every layer; each layer writes its K/V into its page pools and attends through
:func:`jaxattn.ragged_paged_attention`, with the work plans built once per step and shared
by all layers of one attention kind. :class:`~jaxattn.serve.model_runner.Llama4Runner`
owns the function and the pools it updates.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import kv_quant, planner
from jaxattn.kernels import qk_rows
from jaxattn.models.llama4 import (Llama4Config, Llama4ForCausalLM, local_heads, sharding,
                                   stored_kv_heads)
from jaxattn.models.llama4.layers import NO_AXES, Axes
from jaxattn.serve import allocator, sampling
from jaxattn.serve import batch as batch_lib
from jaxattn.serve import kv_cache as kv_cache_lib
from jaxattn.serve.batch import StepBatch
from jaxattn.serve.sampling_params import MAX_LOGPROBS


def attention_kinds(config: Llama4Config) -> tuple:
    """The attention kinds of the model's layers: None (global) first, then the chunk size."""
    chunks = {config.layer_chunk_size(i) for i in range(config.num_hidden_layers)}
    return tuple(sorted(chunks, key=lambda c: -1 if c is None else c))


def plans(config: Llama4Config, bounds: jaxattn.Bounds, batch: StepBatch,
          impl: str = "auto", dtype=jnp.bfloat16, kv_dtype=None) -> tuple:
    """The work plans of one step, one per kind of :func:`attention_kinds`.

    Built once per step (outside any ``shard_map``: the same replicated plan feeds
    every device, whose bounds count its local heads) and shared by every layer; for the
    kernels, with the metadata they derive from it (``jaxattn.kernels.prepare``). ``impl``
    resolves as every layer's attention will: for q of ``dtype`` over a ``kv_dtype`` cache.
    """
    step_plans = tuple(planner.plan(bounds, batch.cu_q_lens, batch.kv_lens, batch.num_seqs,
                                    chunk_size=c) for c in attention_kinds(config))
    if jaxattn.api.resolve_impl(impl, bounds, dtype, kv_dtype) not in ("mosaic", "interpret"):
        return step_plans
    from jaxattn import kernels

    t = batch.token_ids.shape[0]
    return tuple(kernels.prepare(p, bounds=bounds, num_tokens=t,
                                 page_table=_page_table(batch, c))
                 for p, c in zip(step_plans, attention_kinds(config)))


def _page_table(batch: StepBatch, chunk_size: int | None):
    """The page table the layers of one attention kind read: chunked-local layers keep their
    own pool (only each sequence's live chunk), so their own table."""
    return batch.page_table if chunk_size is None else batch.chunked_page_table


def decode_only_bucket(buckets: tuple[int, ...], bounds: jaxattn.Bounds, impl: str,
                       dtype, kv_dtype=None) -> int | None:
    """The step size compiled for decode rows only (None: none): the smallest bucket, when
    there is a larger one for steps with prefill rows, it holds only compact decode rows
    (``<= max_num_seqs * dq``) and the attention runs on the kernels (whose prefill pass,
    merge and gathers a decode step then skips: fewer launches where the host is the
    bottleneck)."""
    if len(buckets) < 2 or buckets[0] > bounds.max_num_seqs * bounds.dq:
        return None
    if jaxattn.api.resolve_impl(impl, bounds, dtype, kv_dtype) not in ("mosaic", "interpret"):
        return None
    return buckets[0]


def chunked_layers(config: Llama4Config) -> tuple[int, ...]:
    """The chunked-local layers: their KV lives in the chunked pools (the hybrid cache)."""
    return tuple(i for i in range(config.num_hidden_layers)
                 if config.layer_chunk_size(i) is not None)


def cache_spec(config: Llama4Config, *, num_pages: int, page_size: int,
               num_chunked_pages: int | None = None, dtype=jnp.bfloat16,
               model_parallel: int = 1) -> kv_cache_lib.CacheSpec:
    """One K and one V pool per layer: ``num_pages`` pages for the global layers,
    ``num_chunked_pages`` (default: as many) for the chunked-local ones, which keep only
    each sequence's live chunk (their own page table). ``model_parallel``: devices the KV
    heads are split over (the spec's byte counts are then per device; on more devices than
    KV heads each device holds one, replicated: ``llama4.stored_kv_heads``). ``dtype="fp8"``:
    the FP8 cache (float8_e4m3fn pages with scales, :mod:`jaxattn.kv_quant`)."""
    chunked = chunked_layers(config)
    num_chunked_pages = (0 if not chunked else num_pages if num_chunked_pages is None
                         else num_chunked_pages)
    return kv_cache_lib.CacheSpec(num_layers=config.num_hidden_layers, num_pages=num_pages,
                                  page_size=page_size,
                                  num_kv_heads=stored_kv_heads(config, model_parallel),
                                  head_dim=config.head_dim, dtype=kv_quant.cache_dtype(dtype).name,
                                  shards=model_parallel, chunked_layers=chunked,
                                  num_chunked_pages=num_chunked_pages)


def forward(model: Llama4ForCausalLM, kv_cache: kv_cache_lib.KVCache, batch: StepBatch, *,
            bounds: jaxattn.Bounds, plans: tuple, impl: str = "auto", gmm_impl: str = "auto",
            axes: Axes = NO_AXES, return_hidden: bool = False, decode_only: bool = False):
    """The new tokens of a packed batch through all layers over the paged cache.

    Returns (logits [S, vocab] f32 at ``batch.logits_indices``, updated cache); with
    ``return_hidden``, (logits, hidden [T, hidden] before the final norm, cache): every
    position's state, from which :func:`prompt_logprobs` scores the prompt.
    Inside ``shard_map`` the cache and weights are this device's shards, ``bounds``
    count its local heads and ``axes`` name the mesh axes. ``decode_only``: every sequence
    of the batch has at most ``bounds.dq`` new tokens (the caller's promise), so the
    attention kernels skip their prefill pass.
    """
    cu, kv_lens, num_seqs = batch.cu_q_lens, batch.kv_lens, batch.num_seqs
    plan_of = dict(zip(attention_kinds(model.config), plans))
    new_k, new_v = list(kv_cache.k), list(kv_cache.v)
    new_ks, new_vs = list(kv_cache.k_scale), list(kv_cache.v_scale)  # FP8 only

    def slots_of(attn):
        # A chunked-local layer reads and writes its own pool through its own table, whose
        # entries before the live chunk name returned pages: the plan never reaches them.
        return batch.chunked_slots if attn.chunk_size is not None else batch.slots

    def kv_target(i, attn):  # the q/k kernel writes k and v itself where it runs
        return qk_rows.KVTarget(new_k[i], new_v[i], slots_of(attn),
                                *((new_ks[i], new_vs[i]) if new_ks else ()))

    def attend(i, attn, q, k, v, written):
        # k and v are in ``written``, the pools kv_target named, updated
        new_k[i], new_v[i], *fp8_scales = written
        scales = {}
        if fp8_scales:  # FP8: quantised per token and KV head as the step wrote them
            new_ks[i], new_vs[i] = fp8_scales
            scales = dict(k_scale=new_ks[i], v_scale=new_vs[i],
                          fixed_k_scale=attn.fixed_k_scale, fixed_v_scale=attn.fixed_v_scale)
        return _paged_attention(q, new_k[i], new_v[i], _page_table(batch, attn.chunk_size),
                                cu, kv_lens, num_seqs, plan_of[attn.chunk_size],
                                bounds=bounds, scale=attn.scale,
                                chunk_size=attn.chunk_size, impl=impl, decode_only=decode_only,
                                out_scale=attn.o_scale, **scales)

    x = model.embed(batch.token_ids, axes)  # [T, hidden]
    valid = jnp.arange(x.shape[0]) < cu[num_seqs]  # [T]: not bucket padding
    x = model.run_layers(x, batch.positions, attend, axes, valid, gmm_impl, kv_target)
    logits = model.logits(x[batch.logits_indices], axes)  # [S, vocab]
    cache = kv_cache_lib.KVCache(k=tuple(new_k), v=tuple(new_v), k_scale=tuple(new_ks),
                                 v_scale=tuple(new_vs))
    return (logits, x, cache) if return_hidden else (logits, cache)


@functools.partial(jax.jit, static_argnames=("bounds", "scale", "chunk_size", "impl",
                                             "decode_only", "fixed_k_scale", "fixed_v_scale",
                                             "out_scale"))
def _paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, plan, *,
                     bounds, scale, chunk_size, impl, decode_only=False, k_scale=None,
                     v_scale=None, fixed_k_scale=None, fixed_v_scale=None, out_scale=None):
    """One layer's attention, as a jitted function so that layers of one kind share it.

    Every chunked-local layer (and every global layer) calls this with the same shapes and
    static arguments, so JAX traces and lowers the kernels once per kind and the module
    calls that one function 48 times, instead of lowering (and embedding) a copy of each
    Mosaic kernel per layer: the step's compile time then barely grows with depth.
    """
    return jaxattn.ragged_paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens,
                                          num_seqs, bounds=bounds, scale=scale,
                                          chunk_size=chunk_size, impl=impl, plan=plan,
                                          k_scale=k_scale, v_scale=v_scale,
                                          fixed_k_scale=fixed_k_scale,
                                          fixed_v_scale=fixed_v_scale, decode_only=decode_only,
                                          out_scale=out_scale)


def step_compiler_options(traced_libraries: bool = True) -> dict | None:
    """XLA options for the step on a GPU: run it as CUDA graphs that stay as recorded.

    A decode step launches ~40 kernels per layer; one by one, the launches cost more than
    the kernels at small batches. XLA's default command buffers leave custom calls (our
    kernels) out and so cut the step into short graphs. A graph is re-recorded when an
    allocation it reads has moved; the step keeps its addresses still (``make_step_fn(
    reuse_outputs=True)``, serve/allocator.py), so under XLA's default allocator each graph
    is recorded once. There a graph holding an all-reduce would re-record on every step, so
    the collectives stay out and a TP=2 step is ~2 graphs per layer per device.

    Under the VMM allocator (a user's choice: serve/allocator.py says why it is not ours)
    ``SKIP_PROFILED`` treats every allocation whose address held still over the first
    executions as fixed, and the all-reduces go inside (COLLECTIVES).

    ``traced_libraries=False`` leaves cuBLAS and cuBLASLt calls out of the graphs. A graph
    that must be re-recorded re-records library calls by stream capture, which is slow: with
    FP8 weights (cuBLASLt FP8 matmuls) on one H200, when 4 of the step's allocations still
    moved every step (its outputs and staged inputs, fixed since by
    ``make_step_fn(reuse_outputs=True)``), a 12-layer Scout slice decoded batch 1 in 6.51
    ms/step with them in and 5.15 with them out. With the step's addresses fixed (under VMM)
    the slice took 4.48 ms out and 5.09 in at batch 1, 7.60 out and 6.96 in at batch 8; FP8
    weights on one device keep them out (benchmarks/NOTES-model.md).

    XLA's DotMerger is off (``xla_gpu_dot_merger_threshold_mb=0``; ``XLA_FLAGS`` may say
    otherwise): it merges dots that share an operand by concatenating the others, and
    when those are weights the step copies them on every call. With FP8 weights on one
    H200 it concatenated each layer's shared-expert gate and up matrices: 2.4 ms of a
    13.3 ms batch-1 decode step (benchmarks/NOTES-model.md).
    """
    if jax.default_backend() != "gpu":
        return None
    vmm = allocator.vmm_active()
    types = ("FUSION," + ("CUBLAS,CUBLASLT," if traced_libraries else "")
             + "CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION" + (",COLLECTIVES" if vmm else ""))
    # JAXATTN_COMMAND_BUFFER overrides the list, for measuring others.
    options = {"xla_gpu_enable_command_buffer": os.environ.get("JAXATTN_COMMAND_BUFFER", types),
               "xla_gpu_graph_min_graph_size": 1}
    if "xla_gpu_dot_merger_threshold_mb" not in os.environ.get("XLA_FLAGS", ""):
        options["xla_gpu_dot_merger_threshold_mb"] = 0
    if os.environ.get("JAXATTN_XLA_DEPENDENT_LAUNCH") == "1":
        # XLA's own kernels wait for their predecessor at their start and are launched early
        # (programmatic dependent launch, as kernels.common.DEPENDENT_LAUNCH does for ours).
        options["xla_gpu_enable_pdl"] = True
    if vmm:
        options["xla_gpu_command_buffer_update_mode"] = os.environ.get(
            "JAXATTN_COMMAND_BUFFER_UPDATE", "SKIP_PROFILED")
    return options


def _shard_step(model: Llama4ForCausalLM, state, bounds: jaxattn.Bounds, local_step,
                return_hidden: bool = False, quantized: bool = False):
    """``local_step(state, kv, batch, plans, axes=)`` as a ``shard_map`` over ``model.mesh``.

    Weights and KV pools enter as each device's shards; the batch and the plans
    are replicated. Logits come out replicated (gathered over the vocabulary).
    """
    config, mesh = model.config, model.mesh
    sharding.check(config, mesh)
    n = sharding.group_size(mesh)
    if (bounds.num_q_heads, bounds.num_kv_heads) != local_heads(config, n):
        raise ValueError(f"bounds count {bounds.num_q_heads}/{bounds.num_kv_heads} heads but one "
                         f"device of this mesh has {local_heads(config, n)}: build them with "
                         f"EngineConfig.bounds(..., model_parallel={n})")
    kv = sharding.kv_sharding(mesh).spec
    layers = config.num_hidden_layers
    scales = {}
    if quantized:  # FP8 scale pools [P, Hkv, page_size]: split by KV head like the values
        sc = sharding.kv_scale_sharding(mesh).spec
        scales = dict(k_scale=(sc,) * layers, v_scale=(sc,) * layers)
    kv_specs = kv_cache_lib.KVCache(k=(kv,) * layers, v=(kv,) * layers, **scales)
    return jax.shard_map(functools.partial(local_step, axes=sharding.axes_for(config, mesh)),
                         mesh=mesh,
                         in_specs=(sharding.state_specs(state, config, mesh, model.fp8), kv_specs, P(),
                                   P()),
                         out_specs=(P(), P(), kv_specs) if return_hidden else (P(), kv_specs),
                         check_vma=False)


def next_decode_step(batch: StepBatch, tokens, bounds: jaxattn.Bounds) -> StepBatch:
    """The decode step after ``batch`` (one new token per sequence, sequence r in row r):
    each sequence's drawn token ``tokens[r]`` (int32 [S]) at the next position, in the slot its
    page tables give it there (the host allocated those pages). Padding rows stay padding."""
    t, s, ps = batch.token_ids.shape[0], bounds.max_num_seqs, bounds.page_size
    rows = jnp.arange(t)
    live = rows < batch.num_seqs  # [T]
    seq = jnp.minimum(rows, s - 1)  # row r's sequence (padding rows: any)
    positions = jnp.where(live, batch.positions + 1, batch.positions)

    def slots(table, old):  # int32 [T] in the pool whose table is [S, pages_per_seq]
        if table.shape[1] == 0:  # no chunked layers
            return old
        page = table[seq, jnp.minimum(positions // ps, table.shape[1] - 1)]
        return jnp.where(live, page * ps + positions % ps, old)

    return batch._replace(
        token_ids=jnp.where(live, tokens[seq], batch.token_ids), positions=positions,
        kv_lens=jnp.where(jnp.arange(s) < batch.num_seqs, batch.kv_lens + 1, batch.kv_lens),
        slots=slots(batch.page_table, batch.slots),
        chunked_slots=slots(batch.chunked_page_table, batch.chunked_slots))


def flat_weights(state) -> tuple[list, jax.tree_util.PyTreeDef]:
    """A model state as its list of arrays, and the treedef that rebuilds it (in a jit).

    A jitted call flattens its arguments on every call, and an nnx state flattens each
    Variable in Python: for Scout's 915 weights (FP8) that took 4.2 ms of host time per step
    on the GPU machine (``ParseArguments`` in the profile; 3.1 ms on a CPU host against
    0.29 ms for the flat list), which a decode step of a few ms cannot hide."""
    return jax.tree.flatten(state)


def make_step_fn(model: Llama4ForCausalLM, bounds: jaxattn.Bounds, *, impl: str = "auto",
                 gmm_impl: str = "auto", compiler_options: dict | None = None,
                 return_hidden: bool = False, quantized_kv: bool = False,
                 decode_only_tokens: tuple[int, ...] = (), reuse_outputs: bool = False):
    """``step(kv_cache, batch, prev_tokens=None) -> (logits [S, vocab] f32, new kv_cache)``, jitted.

    Shapes depend only on ``bounds`` and the batch's token count T, so it
    compiles once per T and never for a new mix of lengths. The cache is
    donated (updated in place on GPU). The weights are those of ``model`` now (and so are the FP8
    cache's K and V scales: :meth:`Llama4ForCausalLM.fix_kv_scales`).
    ``step.jitted`` is the underlying jitted function (for compile counting); it takes the
    weights as ``step.weights`` (:func:`flat_weights`) and the batch packed into one int32
    vector (``jaxattn.serve.batch.pack``): one host-to-device copy.
    ``impl`` / ``gmm_impl``: the attention and grouped matmul implementations.
    ``compiler_options``: XLA options for the step (None: :func:`step_compiler_options`,
    with cuBLAS/cuBLASLt outside the graphs for FP8 weights on one device).
    ``quantized_kv``: the cache is FP8 (its pools carry scale pools; on a mesh their
    sharding is declared up front). ``decode_only_tokens``: step sizes whose batches hold
    only decode rows (at most ``bounds.dq`` new tokens per sequence; :func:`decode_only_bucket`):
    their attention skips the kernels' prefill pass. The caller keeps that promise.

    ``prev_tokens`` (int32 [S], on the device) lets a step start before the previous
    one's sampled tokens reach the host: a batch token id ``-(r + 1)`` stands for
    ``prev_tokens[r]`` (the engine's async scheduling passes the last step's draws).

    With the weights on a mesh (``model.mesh``), the layers run per device inside
    ``shard_map`` on local heads and experts (the attention kernels are custom calls
    that XLA cannot partition), the cache is split by KV head, and ``bounds`` must
    count one device's heads (``EngineConfig.bounds(..., model_parallel=)``). The plans
    are built once, before the ``shard_map``, and every device reads the same ones.

    ``return_hidden``: the step returns ``(logits, hidden [T, hidden], kv_cache)``, the last
    layer's state at every position, for :func:`make_prompt_logprobs_fn` (it costs no
    compute: the buffer exists anyway and is only kept).

    ``reuse_outputs``: each step writes its logits (and hidden states) into the buffers of
    the previous step's (of the same size T), donated, so that every output stays at one
    address and the step's CUDA graphs need no update (step_compiler_options); the price
    is that a step's outputs are valid only until the next step (of that size). For a
    caller that consumes them at once, like the runner. Without it, each output is a new
    allocation, and on one device (one graph per step) that re-recorded the whole graph
    every step.
    """
    model.fix_kv_scales()  # an FP8 cache's K/V scales, from the weights (static: in graphdef)
    graphdef, state = nnx.split(model)
    weights, treedef = flat_weights(state)
    config, dtype = model.config, model.dtype  # dtype: the attention's q/k/v

    mesh = model.mesh

    def local_step_fn(decode_only: bool):
        def local_step(state, kv_cache, batch, step_plans, axes=NO_AXES):
            return forward(nnx.merge(graphdef, state), kv_cache, batch, bounds=bounds,
                           plans=step_plans, impl=impl, gmm_impl=gmm_impl, axes=axes,
                           return_hidden=return_hidden, decode_only=decode_only)

        if mesh is None:
            return local_step
        return _shard_step(model, state, bounds, local_step, return_hidden, quantized_kv)

    local_steps = {False: local_step_fn(False)}
    if decode_only_tokens:
        local_steps[True] = local_step_fn(True)

    if compiler_options is None:
        # FP8 weights on one device: measured faster with the library calls outside.
        compiler_options = step_compiler_options(
            traced_libraries=model.fp8 is None or model.mesh is not None)

    def staged_batch(packed, prev_tokens, num_tokens: int) -> StepBatch:
        # packed: batch_lib.pack(StepBatch), or a longer vector that starts with it (the
        # staging buffer); prev_tokens: int32 [S], the draws a negative token id names.
        packed = packed[:batch_lib.packed_size(num_tokens, bounds)]
        batch = batch_lib.unpack(packed, bounds, num_tokens)
        ids = batch.token_ids
        return batch._replace(token_ids=jnp.where(
            ids < 0, prev_tokens[jnp.clip(-ids - 1, 0, prev_tokens.shape[0] - 1)], ids))

    def model_step(weights, kv_cache, batch: StepBatch, num_tokens: int):
        step_plans = plans(config, bounds, batch, impl, dtype, kv_cache.k[0].dtype)
        return local_steps[num_tokens in decode_only_tokens](
            jax.tree.unflatten(treedef, weights), kv_cache, batch, step_plans)

    # keep_unused: `outputs` is only donated, never read, and must not be pruned.
    @functools.partial(jax.jit, donate_argnums=(1,), donate_argnames=("outputs",),
                       static_argnames=("num_tokens",), keep_unused=True,
                       compiler_options=compiler_options or None)
    def jitted(weights, kv_cache, packed, prev_tokens, num_tokens, outputs=None):
        # weights: flat_weights(the model's state)[0]. outputs: None, or a previous step's
        # (logits, hidden) buffers, donated: JAX writes this step's into them.
        return model_step(weights, kv_cache, staged_batch(packed, prev_tokens, num_tokens),
                          num_tokens)

    @functools.partial(jax.jit, donate_argnums=(1, 5),
                       static_argnames=("num_tokens", "mode", "rows"),
                       compiler_options=compiler_options or None)
    def jitted_multi(weights, kv_cache, packed, prev_tokens, params, drawn, num_tokens, mode,
                     rows):
        # drawn.token_ids.shape[0] decode steps of a batch of one-token rows, each step's
        # draws the next one's tokens, in one scan on the device (multi_step below). drawn:
        # the previous call's draws [num_steps, S, ...], donated: every row is rewritten.
        def body(i, carry):
            kv, batch, drawn = carry
            out = model_step(weights, kv, batch, num_tokens)
            logits, kv = out[0], out[-1]  # (logits, [hidden,] cache)
            now = sampling.sample(logits, params._replace(position=params.position + i),
                                  mode=mode, want_logprobs=True, rows=rows)
            drawn = jax.tree.map(lambda acc, x: acc.at[i].set(x), drawn, now)
            return kv, next_decode_step(batch, now.token_ids, bounds), drawn

        kv_cache, _, drawn = lax.fori_loop(
            0, drawn.token_ids.shape[0], body,
            (kv_cache, staged_batch(packed, prev_tokens, num_tokens), drawn))
        return drawn, kv_cache

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def stage(staging, prev_staging, packed, prev_tokens):
        return (lax.dynamic_update_slice(staging, packed, (0,)),
                lax.dynamic_update_slice(prev_staging, prev_tokens, (0,)))

    @functools.partial(jax.jit, donate_argnums=(0,))
    def stage_params(kept_params, params):
        return jax.tree.map(lambda k, x: lax.dynamic_update_slice(k, x.astype(k.dtype), (0,)),
                            kept_params, params)

    @jax.jit
    def copy_out(drawn):
        return jax.tree.map(jnp.copy, drawn), drawn.token_ids[-1]

    device = jax.devices()[0]
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, P())
    multi_process = jax.process_count() > 1
    zeros = np.zeros(bounds.max_num_seqs, np.int32)  # prev_tokens of a step that needs none

    def put(host):  # a replicated device copy of a host vector
        if multi_process:
            return jax.make_array_from_callback(host.shape, replicated, lambda i: host[i])
        return jax.device_put(host, replicated or device)

    no_prev = put(zeros)
    staging_size = batch_lib.packed_size(bounds.max_num_batched_tokens, bounds)  # any step's
    head_rows = (model.lm_head or model.model.embed_tokens).weight.shape[0]
    # Buffers that stay at one address from step to step (the step's CUDA graphs record
    # addresses; see step_compiler_options): the staged batch and previous tokens, and with
    # reuse_outputs the logits and each step size's hidden states.
    kept = {}

    def buffer(key, shape, dtype):
        x = kept.pop(key, None)
        if x is None or x.is_deleted():  # first use, or lost with a failed step
            x = jnp.zeros(shape, dtype, device=replicated or device)
        return x

    def staged(kv_cache, batch: StepBatch, prev_tokens):
        """The step's inputs at fixed addresses: (cache, staged batch, staged prev_tokens)."""
        # An uncommitted pool (e.g. fresh from a jit without out_shardings) has another
        # cache key than the committed pools a step returns: commit it (no copy) so the
        # first step does not compile a second time.
        if mesh is None and not all(x.committed for x in kv_cache.arrays()):
            kv_cache = jax.tree.map(
                lambda x: x if x.committed else jax.device_put(x, device), kv_cache)
        # Host numpy goes to jit as is: jit's own transfer measured ~50 us cheaper than a
        # device_put first (H100 machine, a 3000-int vector: 124 vs 175 us to a result).
        packed = batch_lib.pack(batch)
        if multi_process and not isinstance(packed, jax.Array):
            # Every process passes the same host batch; each puts its devices' copies.
            packed = put(packed)
        elif replicated is not None:
            packed = jax.device_put(packed, replicated)
        if prev_tokens is None:
            if isinstance(batch.token_ids, np.ndarray) and batch.token_ids.min(initial=0) < 0:
                raise ValueError("the batch takes tokens from a previous step (negative ids) "
                                 "but no prev_tokens were given")
            prev_tokens = no_prev
        # The batch and the previous tokens arrive at new addresses every step; a small jit
        # of its own copies them into the kept buffers, so that the step reads only fixed
        # addresses and its graphs are never re-recorded.
        kept["staging"], kept["prev"] = stage(
            buffer("staging", (staging_size,), jnp.int32),
            buffer("prev", (bounds.max_num_seqs,), jnp.int32), packed, prev_tokens)
        return kv_cache, kept["staging"], kept["prev"]

    def step(kv_cache: kv_cache_lib.KVCache, batch: StepBatch, prev_tokens=None):
        kv_cache, packed, prev_tokens = staged(kv_cache, batch, prev_tokens)
        t = len(batch.token_ids)
        outputs = None
        if reuse_outputs:
            outputs = (buffer("logits", (bounds.max_num_seqs, head_rows), jnp.float32),)
            if return_hidden:
                outputs += (buffer(t, (t, config.hidden_size), dtype),)
        out = jitted(weights, kv_cache, packed, prev_tokens, num_tokens=t, outputs=outputs)
        if reuse_outputs:
            kept["logits"] = out[0]
            if return_hidden:
                kept[t] = out[1]
        return out

    def multi_step(kv_cache: kv_cache_lib.KVCache, batch: StepBatch, prev_tokens,
                   params: sampling.SamplingBatch, num_steps: int, mode: str, rows: int):
        """``num_steps`` decode steps in one call -> (draws, each field [num_steps, S]; the
        last step's tokens [S]; the updated cache), all on the device.

        ``batch`` holds one new token per sequence, sequence r in row r (a decode step),
        and pages for ``num_steps`` tokens each; ``params`` draws step 0's tokens (step i
        draws at ``position + i``, sampling its first ``rows`` rows: the sequences' own,
        the rest zeros), every field of the draws with top logprobs. The
        draws of step i are the tokens of step i + 1, which the loop makes on the device
        (:func:`next_decode_step`): the host runs one execution for all of them, where
        its per-execution work (XLA's pass over the step's ~600 launches, the graph's
        launch) is what limits small decode batches."""
        q_lens = np.diff(np.asarray(batch.cu_q_lens))
        if q_lens.max(initial=0) > 1:
            raise ValueError("multi_step takes decode rows only (one new token per sequence)")
        kv_cache, packed, prev_tokens = staged(kv_cache, batch, prev_tokens)
        # The sampling rows too go to kept buffers: the loop's graphs read them.
        params = sampling.SamplingBatch(*(np.asarray(x) for x in params))
        if multi_process:
            params = jax.tree.map(put, params)
        elif replicated is not None:
            params = jax.device_put(params, replicated)
        names = sampling.SamplingBatch._fields
        params = stage_params(sampling.SamplingBatch(*(
            buffer(("params", f), x.shape, x.dtype) for f, x in zip(names, params))), params)
        kept.update(zip((("params", f) for f in names), params))
        # The draws go into the previous call's buffers (zeros the first time), so that every
        # call has the same signature: one compile, and the outputs stay at one address.
        s, k = bounds.max_num_seqs, min(MAX_LOGPROBS, head_rows)
        shapes = ((num_steps, s), (num_steps, s), (num_steps, s, k), (num_steps, s, k))
        keys = [("drawn", num_steps, f) for f in sampling.Sampled._fields]
        drawn = sampling.Sampled(*(buffer(key, shape, dtype) for key, shape, dtype in zip(
            keys, shapes, (jnp.int32, jnp.float32, jnp.int32, jnp.float32))))
        drawn, kv_cache = jitted_multi(weights, kv_cache, packed, prev_tokens, params, drawn,
                                       num_tokens=len(batch.token_ids), mode=mode, rows=rows)
        kept.update(zip(keys, drawn))
        # The caller keeps the draws past the next call, which reuses these buffers.
        out, last = copy_out(drawn)
        return out, last, kv_cache

    step.jitted, step.weights, step.multi, step.jitted_multi = (jitted, weights, multi_step,
                                                                jitted_multi)
    return step


# Rows of hidden state scored at once by the prompt-logprob head: its [rows, vocab] f32 logits
# are the largest buffer it makes (~100 MB for Scout's 202k vocabulary), whatever the step size.
PROMPT_LOGPROB_BLOCK = 128


def make_prompt_logprobs_fn(model: Llama4ForCausalLM, k: int):
    """``fn(hidden [T, hidden], targets int32 [T]) -> (logprob [T], top_ids [T, k], top_lp [T, k])``.

    The log-probability of ``targets[t]`` (the prompt's next token) under the distribution
    at position t, and the k most likely tokens there, from a step's hidden states
    (``make_step_fn(return_hidden=True)``): the final norm and LM head over blocks of
    :data:`PROMPT_LOGPROB_BLOCK` rows. A row whose target is negative is not asked for (its
    values are meaningless). Jitted; compiles once per step size T. Run only for steps in
    which some sequence wants its prompt's logprobs, so other steps pay nothing.
    Under a mesh the weights stay sharded and XLA partitions the head.
    """
    graphdef, state = nnx.split(model)
    weights, treedef = flat_weights(state)

    @jax.jit
    def head(weights, hidden, targets):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        outs = []
        # A Python loop over static blocks, not lax.map: a scan is a while loop on the GPU,
        # whose predicate the host reads, and the engine must not wait on a step it enqueued.
        for start in range(0, hidden.shape[0], PROMPT_LOGPROB_BLOCK):
            x = hidden[start:start + PROMPT_LOGPROB_BLOCK]
            y = targets[start:start + PROMPT_LOGPROB_BLOCK]
            lp = jax.nn.log_softmax(m.logits(x), axis=-1)  # [block, vocab] f32
            chosen = jnp.take_along_axis(lp, jnp.clip(y, 0, lp.shape[-1] - 1)[:, None], -1)[:, 0]
            top_lp, top_ids = sampling.top_k(lp, k)
            outs.append((chosen, top_ids, top_lp))
        return tuple(jnp.concatenate(parts) for parts in zip(*outs))

    return lambda hidden, targets: head(weights, hidden, targets)
