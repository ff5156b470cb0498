"""The GPU serving step has no data-dependent control flow outside its kernels.

XLA runs a ``cond``, or a ``while`` whose trip count is not static, by copying
the predicate to the host and branching there: each one stalls the host until the
GPU has caught up, so the step cannot be enqueued ahead of the GPU, and CUDA
graphs are cut at it. One per attention layer made a 4-layer decode step's host
dispatch take 2.45 of its 3.20 ms (H100, benchmarks/results/model-2026-11-25.json).
Work that may be empty is skipped inside the kernels instead (they read the valid
counts). Static-trip-count loops (``scan``) are allowed but should stay rare: each
iteration is separate kernel launches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from jaxattn import kv_quant, parallel
from jaxattn.models import llama4
from jaxattn.models.llama4 import sharding
from jaxattn.serve import batch as batch_lib
from jaxattn.serve import kv_cache as cache
from jaxattn.serve import paged_step, sampling
from jaxattn.serve.batch import SeqStep, build_step
from jaxattn.serve.config import EngineConfig

_KERNELS = ("mpmd_map", "pallas_call")  # Mosaic GPU kernel bodies: their loops run on the GPU


def _primitives(jaxpr, found):
    for eqn in jaxpr.eqns:
        found[eqn.primitive.name] = found.get(eqn.primitive.name, 0) + 1
        if eqn.primitive.name not in _KERNELS:
            for sub in jaxprs_in_params(eqn.params):
                _primitives(sub, found)
    return found


def test_gpu_step_has_no_host_synchronising_control_flow(lowering_model):
    config, model = lowering_model
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    step = paged_step.make_step_fn(model, bounds, impl="mosaic", gmm_impl="mosaic")
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype=jnp.bfloat16)
    batch = build_step(bounds, 256, [SeqStep([1] * 100, 0, [0, 1]), SeqStep([2], 64, [2, 3])],
                       num_pages=32)
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    jaxpr = jax.make_jaxpr(step.jitted, static_argnums=4)(
        step.weights, kv, batch_lib.pack(batch), jnp.zeros(4, jnp.int32), 256)
    found = _primitives(jaxpr.jaxpr, {})
    assert found.get("mpmd_map", 0) >= 2 * config.num_hidden_layers  # the kernels are in the step
    assert not {p: found[p] for p in ("cond", "while") if p in found}
    assert found.get("scan", 0) == 0


def test_step_takes_its_weights_as_a_flat_list_of_arrays(lowering_model):
    """The jitted step's weights are plain arrays: an nnx state costs a Python flatten per
    Variable on every call (paged_step.flat_weights)."""
    config, model = lowering_model
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    step = paged_step.make_step_fn(model, bounds)
    assert isinstance(step.weights, list) and len(step.weights) > 4 * config.num_hidden_layers
    assert all(isinstance(w, jax.Array) for w in step.weights)


def test_decode_only_step_lowers_without_the_prefill_kernel(lowering_model):
    """The runner's decode-only bucket (``make_step_fn(decode_only_tokens=)``): one Mosaic
    kernel fewer per layer (no prefill pass), no host-synchronising control flow, and it
    lowers for CUDA; other step sizes keep the general step."""
    config, model = lowering_model
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    assert paged_step.decode_only_bucket((16, 256), bounds, "mosaic", jnp.bfloat16) == 16
    assert paged_step.decode_only_bucket((16, 256), bounds, "reference", jnp.bfloat16) is None
    assert paged_step.decode_only_bucket((256,), bounds, "mosaic", jnp.bfloat16) is None
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype=jnp.bfloat16)
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    batch = build_step(bounds, 16, [SeqStep([1], 99, [0, 1]), SeqStep([2, 3], 64, [2, 3])],
                       num_pages=32)
    args = (paged_step.flat_weights(nnx.split(model)[1])[0], kv, batch_lib.pack(batch),
            jnp.zeros(4, jnp.int32), 16)
    counts = {}
    for tokens in ((), (16,)):
        step = paged_step.make_step_fn(model, bounds, impl="mosaic", gmm_impl="mosaic",
                                       decode_only_tokens=tokens)
        found = _primitives(jax.make_jaxpr(step.jitted, static_argnums=4)(*args).jaxpr, {})
        assert not {p: found[p] for p in ("cond", "while") if p in found}
        counts[tokens] = found["mpmd_map"]
    assert counts[()] - counts[(16,)] == config.num_hidden_layers
    exported = jax.export.export(step.jitted, platforms=["cuda"])(*args[:4], num_tokens=16)
    assert exported.mlir_module().count("mosaic_gpu") >= config.num_hidden_layers


def test_multi_step_decode_is_one_static_loop_and_lowers(lowering_model):
    """The decode burst (``num_scheduler_steps``): the step and the sampler inside one
    ``scan`` of a static trip count, which XLA runs without reading a predicate on the host
    (no ``while`` or ``cond`` besides), over the decode-only kernels; it lowers for CUDA."""
    config, model = lowering_model
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype=jnp.bfloat16)
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    batch = build_step(bounds, 16, [SeqStep([1], 99, [0, 1]), SeqStep([2], 64, [2, 3])],
                       num_pages=32)
    step = paged_step.make_step_fn(model, bounds, impl="mosaic", gmm_impl="mosaic",
                                   decode_only_tokens=(16,))
    params = sampling.SamplingBatch.build([(0.7, 5, 0.9, 1, 0, 0)] * 2, 4)
    drawn = sampling.Sampled(jnp.zeros((4, 4), jnp.int32), jnp.zeros((4, 4)),
                             jnp.zeros((4, 4, 20), jnp.int32), jnp.zeros((4, 4, 20)))  # 4 steps
    args = (step.weights, kv, batch_lib.pack(batch), jnp.zeros(4, jnp.int32), params, drawn)
    for mode in sampling.MODES:
        multi = functools.partial(step.jitted_multi, num_tokens=16, mode=mode, rows=2)
        found = _primitives(jax.make_jaxpr(multi)(*args).jaxpr, {})
        assert found.get("scan") == 1
        assert not {p: found[p] for p in ("cond", "while") if p in found}
    exported = jax.export.export(step.jitted_multi, platforms=["cuda"])(
        *args, num_tokens=16, mode="filtered", rows=2)
    assert exported.mlir_module().count("mosaic_gpu") >= config.num_hidden_layers


@pytest.mark.parametrize("mode", sampling.MODES)
@pytest.mark.parametrize("want_logprobs", [False, True])
def test_sampler_has_no_host_synchronising_control_flow(mode, want_logprobs):
    """The engine enqueues step n+1 before step n's tokens are on the host; a cond in the
    sampler would stall that (it did: three, on all-greedy, top-k/p and logprobs)."""
    rows = [(0.7, 5, 0.9, 1, 0, 0)] * 4
    jaxpr = jax.make_jaxpr(functools.partial(sampling.sample, mode=mode,
                                             want_logprobs=want_logprobs))(
        jnp.zeros((4, 512), jnp.float32), sampling.SamplingBatch.build(rows, 4))
    found = _primitives(jaxpr.jaxpr, {})
    assert not {p: found[p] for p in ("cond", "while") if p in found}


@pytest.mark.parametrize("mode", sampling.MODES)
def test_processed_sampler_has_no_host_synchronising_control_flow(mode):
    """Penalties, bias, min_p and grammar masks keep the sampler free of conds too."""
    rows = [(0.7, 5, 0.9, 1, 0, 0)] * 4
    proc = sampling.Processing.neutral(4, 512, 4)
    jaxpr = jax.make_jaxpr(functools.partial(sampling.sample_processed, mode=mode,
                                             want_logprobs=True))(
        jnp.zeros((4, 512), jnp.float32), sampling.SamplingBatch.build(rows, 4), proc,
        jnp.zeros((5, 512), jnp.int32))
    found = _primitives(jaxpr.jaxpr, {})
    assert not {p: found[p] for p in ("cond", "while") if p in found}


def test_prompt_logprob_head_has_no_host_synchronising_control_flow(lowering_model):
    """The head that scores prompts runs between enqueued steps: no cond / while / scan."""
    config, model = lowering_model
    head = paged_step.make_prompt_logprobs_fn(model, 20)
    jaxpr = jax.make_jaxpr(head)(jnp.zeros((300, 256), jnp.bfloat16), jnp.zeros(300, jnp.int32))
    found = _primitives(jaxpr.jaxpr, {})
    assert not {p: found[p] for p in ("cond", "while", "scan") if p in found}
    out = head(jnp.zeros((300, 256), jnp.bfloat16), jnp.zeros(300, jnp.int32))
    assert [x.shape for x in out] == [(300,), (300, 20), (300, 20)]


def test_fp8_weights_on_one_device_keep_library_calls_out_of_the_graphs(monkeypatch,
                                                                         lowering_model):
    """step_compiler_options(traced_libraries=False) for FP8 weights without a mesh, the
    default (library calls inside the CUDA graphs) otherwise."""
    from jaxattn.models.llama4.quantization import Fp8Scheme

    asked = []
    monkeypatch.setattr(paged_step, "step_compiler_options",
                        lambda **kw: asked.append(kw.get("traced_libraries", True)) or None)
    config, model = lowering_model
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    paged_step.make_step_fn(model, bounds)
    fp8 = llama4.init_random(config, seed=0, dtype=jnp.bfloat16, fp8=Fp8Scheme())
    paged_step.make_step_fn(fp8, bounds)
    assert asked == [True, False]


@pytest.mark.parametrize("on_mesh,defaults,swiglu,dependent", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, True, True, False), (False, True, True, True)],
    ids=["no_mesh", "one_device_mesh", "route_in_norm_static_o_scale", "swiglu_in_gate_up",
         "dependent_launch"])
def test_fp8_decode_step_lowers_with_its_experts_in_token_order(monkeypatch, lowering_model,
                                                                 on_mesh, defaults, swiglu,
                                                                 dependent):
    """The FP8 model's decode step (16 rows), with the kernels a Hopper GPU picks: the
    routed experts run by row in token order (no sort by expert), each residual add after
    the first layer's input runs in the norm kernel after it (with the epilogues of the
    FP8 products it adds, and with ``ROUTE_IN_NORM`` the top-1 routing of an MoE layer's
    rows), no host-synchronising control flow or loops, and it lowers for CUDA. The same on
    a mesh of one device (TP=1, as benchmarks/multigpu runs it): its size-1 axes reduce
    nothing, so they keep nothing out of the norm kernels (they did until 2026-12-01: the
    H200 profile kept ~4 XLA epilogue kernels a layer). ``defaults``: the model's defaults
    (``ROUTE_IN_NORM``, and ``STATIC_O_SCALE`` in a decode-only bucket: the decode kernels
    write the attention's FP8 rows, no quantising launch), else both off. ``swiglu``:
    ``SWIGLU_IN_GATE_UP`` too (the MoE layers' SwiGLU from the gate/up launch, no SwiGLU
    kernel, the down launch on its f16 rows). ``dependent``: ``common.DEPENDENT_LAUNCH``,
    every Mosaic kernel launched as a programmatic dependent of the one before (and none
    without it)."""
    from jaxattn.kernels import common, decode, fp8, fp8_rows, grouped_matmul, qk_rows
    from jaxattn.models.llama4 import moe as moe_lib
    from jaxattn.models.llama4.quantization import Fp8Scheme

    route_in_norm = defaults
    monkeypatch.setattr(common, "on_hopper", lambda: True)
    monkeypatch.setattr(llama4.model, "ROUTE_IN_NORM", route_in_norm)
    monkeypatch.setattr(llama4.model, "STATIC_O_SCALE", defaults)
    monkeypatch.setattr(moe_lib, "SWIGLU_IN_GATE_UP", swiglu)
    monkeypatch.setattr(common, "DEPENDENT_LAUNCH", dependent)
    jax.clear_caches()  # kernels are jits of their own, traced with the flag as it was
    swiglu_quantize, swiglus = fp8_rows.swiglu_quantize, []
    monkeypatch.setattr(fp8_rows, "swiglu_quantize", lambda *a, **k: swiglus.append(1) or
                        swiglu_quantize(*a, **k))
    quantized, quantize = [], fp8_rows.quantize
    monkeypatch.setattr(fp8_rows, "quantize", lambda *a, **k: quantized.append(1) or
                        quantize(*a, **k))
    out_scales, decode_attention = [], decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: out_scales.append(
        k.get("out_scale")) or decode_attention(*a, **k))
    # The layers' attention is a jit of its own: an earlier test's trace of it at these
    # shapes would be reused without calling decode_attention.
    paged_step._paged_attention.clear_cache()
    add_norm, add_norms, routed = fp8_rows.add_rms_norm_quantize, [], []
    monkeypatch.setattr(fp8_rows, "add_rms_norm_quantize",
                        lambda x, delta, *a, **k: add_norms.append(delta) or routed.append(
                            k.get("router") is not None) or add_norm(x, delta, *a, **k))

    config, _ = lowering_model
    # Three layers: the MoE layer (1) then has a norm after it.
    config = llama4.Llama4Config.from_hf_dict({**config.to_hf_dict(), "num_hidden_layers": 3})
    # Toy projections are too few tiles for the dense FP8 kernel unless told (Scout's are not)
    monkeypatch.setattr(grouped_matmul, "DENSE_MIN_N_TILES", 1)
    rope_norm, qk_calls = qk_rows._rope_norm_kernel, []
    monkeypatch.setattr(qk_rows, "_rope_norm_kernel",
                        lambda *a, **k: qk_calls.append(k) or rope_norm(*a, **k))
    model = llama4.init_random(config, seed=0, dtype=jnp.bfloat16, fp8=Fp8Scheme(attention=True))
    if on_mesh:
        model = sharding.shard(model, parallel.make_mesh(parallel.ParallelConfig()))
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64).bounds(config)
    by_row, calls = moe_lib.grouped_matmul_fp8_by_row, []
    monkeypatch.setattr(moe_lib, "grouped_matmul_fp8_by_row",
                        lambda *a, **k: calls.append(k.get("swiglu", False)) or by_row(*a, **k))
    monkeypatch.setattr(moe_lib, "counting_sort", None)  # not called
    route, routes = fp8_rows._route_scales_kernel, []
    monkeypatch.setattr(fp8_rows, "_route_scales_kernel",
                        lambda *a, **k: routes.append(1) or route(*a, **k))
    step = paged_step.make_step_fn(model, bounds, impl="mosaic", gmm_impl="mosaic",
                                   decode_only_tokens=(16,) if defaults else ())
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype=jnp.bfloat16)
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    batch = build_step(bounds, 16, [SeqStep([1], 99, [0, 1]), SeqStep([2], 64, [2, 3])],
                       num_pages=32)
    args = (step.weights, kv, batch_lib.pack(batch), jnp.zeros(4, jnp.int32))
    found = _primitives(jax.make_jaxpr(step.jitted, static_argnums=4)(*args, 16).jaxpr, {})
    assert not {p: found[p] for p in ("cond", "while", "scan") if p in found}
    moe_layers = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
    assert calls == [swiglu, False] * moe_layers  # gate/up (forming the SwiGLU), down
    # A SwiGLU kernel per dense MLP, and per MoE layer unless gate/up formed it
    assert len(swiglus) == config.num_hidden_layers - (moe_layers if swiglu else 0)
    # the top-1 and the rows' scales in one kernel (XLA's argmax and concatenates), unless
    # the norm before routed the rows
    assert len(routes) == (0 if route_in_norm else moe_layers)
    # RoPE and the QK-norm (or a NoPE layer's temperature) in one kernel a layer, which
    # writes k and v into the bf16 cache too (no scatter kernels)
    assert len(qk_calls) == config.num_hidden_layers
    assert found.get("run_state") == config.num_hidden_layers  # its pools updated in place
    assert len(add_norms) == 2 * config.num_hidden_layers - 1
    # Every update reaches the norm as FP8 products unscaled: the matmuls' epilogues (and
    # the shared and routed experts' sum) run in the norm's kernel.
    assert all(isinstance(t, fp8.Unscaled) for delta in add_norms for t in delta)
    # Terms: o_proj's; then, for the next layer's input norm, the routed and shared
    # experts' stacked (one launch's products) after an MoE layer, the MLP's after a dense one.
    assert [len(delta) for delta in add_norms] == [1] * len(add_norms)
    stacked = [delta[0].stacked for delta in add_norms]
    assert stacked == [i % 2 == 1 and config.is_moe(i // 2) for i in range(len(add_norms))]
    assert any(stacked)
    # With ROUTE_IN_NORM the MoE layers' post-attention norms route the rows too.
    assert routed == [route_in_norm and i % 2 == 0 and config.is_moe(i // 2)
                      for i in range(len(add_norms))]
    # The attention output: quantised per token by a kernel, or FP8 from the decode kernels
    assert len(quantized) == (0 if defaults else config.num_hidden_layers)
    assert out_scales and all((s is not None) == defaults for s in out_scales)
    exported = jax.export.export(step.jitted, platforms=["cuda"])(*args, num_tokens=16)
    text = exported.mlir_module()
    assert text.count("mosaic_gpu") >= config.num_hidden_layers
    kernels = text.count("custom_call @mosaic_gpu_v2")  # (a nested jit's are written once)
    assert kernels >= 2 * config.num_hidden_layers
    assert text.count("mosaic_gpu.uses_pdl") == (kernels if dependent else 0)


def test_fp8_cache_decode_step_writes_the_cache_in_the_qk_kernel(monkeypatch, lowering_model):
    """With an FP8 cache the decode step's q/k rows kernel quantises k and v into the pools
    too (values and scales updated in place), as it writes a bf16 cache: no XLA quantisation
    or scatters per layer (a full Scout step took 7.84 ms at batch 1 x 8k with them, 7.20
    with a bf16 cache). It lowers for CUDA."""
    from jaxattn.kernels import common, grouped_matmul, qk_rows
    from jaxattn.models.llama4.quantization import Fp8Scheme

    monkeypatch.setattr(common, "on_hopper", lambda: True)
    # toy projections are too few tiles for the dense FP8 kernel (and its joint output)
    monkeypatch.setattr(grouped_matmul, "DENSE_MIN_N_TILES", 1)
    rope_norm, targets = qk_rows._rope_norm_kernel, []
    monkeypatch.setattr(qk_rows, "_rope_norm_kernel", lambda *a, **k: targets.append(
        (a[3], k["fixed_k_scale"], k["fixed_v_scale"])) or rope_norm(*a, **k))
    config, _ = lowering_model
    # head_dim 128: the kernel's FP8 rows must lie 128 bytes apart (D=64 takes XLA's writes);
    # FP8 projections: the kernel takes their joint q/k/v output
    config = llama4.Llama4Config.from_hf_dict({**config.to_hf_dict(), "head_dim": 128})
    model = llama4.init_random(config, seed=0, dtype=jnp.bfloat16, fp8=Fp8Scheme(attention=True))
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64, kv_cache_dtype="fp8").bounds(config)
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype="fp8")
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    batch = build_step(bounds, 16, [SeqStep([1], 99, [0, 1]), SeqStep([2], 64, [2, 3])],
                       num_pages=32)

    def trace():
        step = paged_step.make_step_fn(model, bounds, impl="mosaic")
        args = (step.weights, kv, batch_lib.pack(batch), jnp.zeros(4, jnp.int32))
        jaxpr = jax.make_jaxpr(step.jitted, static_argnums=4)(*args, 16).jaxpr
        return step, args, _primitives(jaxpr, {})

    with monkeypatch.context() as m:  # the same step with XLA's q/k ops and writes
        m.setattr(qk_rows, "_use_kernel", lambda *a: False)
        _, _, xla = trace()
    step, args, found = trace()
    assert len(targets) == config.num_hidden_layers and all(t.fp8 for t, *_ in targets)
    # both layers RoPE with the qk norm: their keys take the one fixed scale, their values
    # the one their weights bound
    assert {f for _, f, _ in targets} == {kv_quant.normed_k_scale(128)}
    assert [fv for *_, fv in targets] == [lyr.self_attn.fixed_v_scale
                                          for lyr in model.model.layers]
    assert None not in [fv for *_, fv in targets]
    assert found.get("run_state") == config.num_hidden_layers
    # per layer, the values' and the scales' scatters of k and v are the kernel's stores
    assert xla["scatter"] - found.get("scatter", 0) == 4 * config.num_hidden_layers
    exported = jax.export.export(step.jitted, platforms=["cuda"])(*args, num_tokens=16)
    assert exported.mlir_module().count("mosaic_gpu") >= config.num_hidden_layers


def test_fp8_cache_step_tells_both_kernels_each_layers_fixed_scales(monkeypatch):
    """A prefill step over an FP8 cache: the chunked (RoPE, qk-normed) layers write their keys
    with kv_quant.normed_k_scale and tell the prefill and decode kernels so; the global
    (NoPE) layer, the one scale its weights bound; every layer its values' one scale
    (Llama4ForCausalLM.fix_kv_scales). It lowers for CUDA."""
    from jaxattn.kernels import common, decode, prefill

    monkeypatch.setattr(common, "on_hopper", lambda: True)
    told = {"prefill": [], "decode": []}
    for kind, module, name in (("prefill", prefill, "prefill_attention"),
                               ("decode", decode, "decode_attention")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, kind=kind, kernel=kernel, **k: told[
            kind].append((k["fixed_k_scale"], k["fixed_v_scale"])) or kernel(*a, **k))
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=512, hidden_size=256, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=256))
    assert [config.use_rope(i) for i in range(4)] == [True, True, True, False]
    model = llama4.init_random(config, seed=0, dtype=jnp.bfloat16)
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=64, kv_cache_dtype="fp8").bounds(config)
    spec = paged_step.cache_spec(config, num_pages=32, page_size=64, dtype="fp8")
    kv = jax.eval_shape(lambda: cache.allocate(spec))
    batch = build_step(bounds, 256, [SeqStep(list(range(200)), 0, [0, 1, 2, 3])], num_pages=32)
    step = paged_step.make_step_fn(model, bounds, impl="mosaic")
    args = (step.weights, kv, batch_lib.pack(batch), jnp.zeros(4, jnp.int32))
    exported = jax.export.export(step.jitted, platforms=["cuda"])(*args, num_tokens=256)
    assert "mosaic_gpu" in exported.mlir_module()
    # one trace per attention kind (its layers share it): chunked, then global
    chunked, nope = (model.model.layers[i].self_attn for i in (0, 3))
    assert nope.fixed_k_scale == kv_quant.power_of_two_scale(model.model.layers[3].kv_bound("k"))
    assert None not in (chunked.fixed_v_scale, nope.fixed_v_scale)
    for kind in ("prefill", "decode"):
        assert sorted(told[kind]) == sorted([(kv_quant.normed_k_scale(128), chunked.fixed_v_scale),
                                             (nope.fixed_k_scale, nope.fixed_v_scale)]), kind


def test_each_kinds_plan_carries_its_own_tables_tile_runs(lowering_model):
    """The step's plans (one per attention kind, shared by that kind's layers) carry the
    prefill's tile runs of the page table those layers read: the global table for global
    layers, the chunked-local one for chunked layers."""
    from jaxattn.kernels import prefill

    config, _ = lowering_model  # 4 layers: the fourth is global (NoPE)
    config = llama4.Llama4Config.from_hf_dict({**config.to_hf_dict(), "num_hidden_layers": 4})
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024,
                          page_size=16).bounds(config)
    # the chunked layers' pages of the first sequence lie elsewhere, in runs of their own
    batch = build_step(bounds, 256, [SeqStep(list(range(1, 200)), 0, range(13),
                                             chunked_pages=range(16, 29)),
                                     SeqStep([2], 64, [20, 21, 22, 23, 24])], num_pages=32)
    kinds = paged_step.attention_kinds(config)
    plans = paged_step.plans(config, bounds, batch, impl="interpret")
    assert len(plans) == len(kinds) == 2
    per_tile = bounds.block_kv // bounds.page_size
    runs = [prefill.tile_first_pages(t, per_tile) for t in (batch.page_table,
                                                            batch.chunked_page_table)]
    assert not np.array_equal(*runs)  # so a plan given the other kind's table would show
    for kind, kplan in zip(kinds, plans):
        table = batch.page_table if kind is None else batch.chunked_page_table
        np.testing.assert_array_equal(kplan.first_pages,
                                      prefill.tile_first_pages(table, per_tile))
