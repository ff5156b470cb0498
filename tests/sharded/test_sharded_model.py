"""The Llama 4 forwards on a mesh equal the single-device forwards (8 simulated devices).

Full forward: every (tensor, expert) split of ``MESHES``, a batch whose length crosses three
chunk boundaries. Serving forward (``paged_step.make_step_fn``): an engine-like loop of chunked prefills
crossing chunk boundaries and decodes over the paged cache split by KV head, compared step by
step with the single-device step; one compile per bucket.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxattn.models import llama4
from jaxattn.models.llama4 import sharding
from jaxattn.serve import kv_cache as cache
from jaxattn.serve import paged_step
from jaxattn.serve.batch import SeqStep, build_step
from jaxattn.serve.config import EngineConfig

from sharded_cases import MESHES, config, max_err, mesh

TOL = 1e-4  # f32; observed ~3e-6 (summation order of the all-reduces)


@pytest.fixture(scope="module", params=[False, True], ids=["base", "variant"])
def case(request):
    c = config(request.param)
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (2, 100)).astype(np.int32)
    ref = llama4.init_random(c, seed=1)
    return request.param, c, ids, np.asarray(ref(ids))


@pytest.mark.slow
def test_full_forward_matches_one_device(case):
    variant, c, ids, want = case
    meshes = [(2, 1), (2, 2), (1, 4)] if variant else MESHES
    for tp, ep in meshes:
        model = sharding.shard(llama4.init_random(c, seed=1), mesh(tp, ep))
        err = max_err(model(ids), want)
        print(f"variant={variant} TP={tp} EP={ep}: max |logit error| {err:.1e}")
        assert err < TOL, (tp, ep)


def test_parameters_land_where_the_table_says():
    m = mesh(2, 4)
    model = sharding.shard(llama4.init_random(config(), seed=0), m)
    layer = model.model.layers[1]
    group = ("expert", "tensor")
    assert layer.self_attn.q_proj.weight[...].sharding == NamedSharding(m, P(group))
    assert layer.self_attn.o_proj.weight[...].sharding == NamedSharding(m, P(None, group))
    assert layer.feed_forward.experts.gate_proj[...].sharding == \
        NamedSharding(m, P("expert", None, "tensor"))
    assert layer.feed_forward.experts.down_proj[...].sharding == \
        NamedSharding(m, P("expert", "tensor"))
    assert layer.feed_forward.router.weight[...].sharding.is_fully_replicated
    # Each device holds 1/8 of the heads and 2 of the 8 experts with half their columns.
    shard = layer.feed_forward.experts.gate_proj[...].addressable_shards[0].data
    assert shard.shape == (2, 64, 32)
    assert layer.self_attn.k_proj.weight[...].addressable_shards[0].data.shape == (16, 64)
    assert model.model.embed_tokens.weight[...].addressable_shards[0].data.shape == (64, 64)
    # The variant's 510-token vocabulary does not split 8 ways: replicated.
    v = sharding.shard(llama4.init_random(config(True), seed=0), m)
    assert v.model.embed_tokens.weight[...].sharding.is_fully_replicated


def test_layer_axes_are_the_axes_that_split_something():
    """Size-1 axes are left out of the layer code's reductions (they reduce nothing)."""
    c = config()
    assert sharding.axes_for(c, mesh(1, 1)) == sharding.axes_for(c, None)
    assert sharding.axes_for(c, mesh(2, 1)).model == ("tensor",)
    assert sharding.axes_for(c, mesh(1, 2)).model == sharding.axes_for(c, mesh(1, 2)).expert
    axes = sharding.axes_for(c, mesh(2, 2))
    assert (axes.model, axes.expert) == (("expert", "tensor"), ("expert",))


def test_impossible_splits_are_refused():
    # 8 devices are a multiple of the 4 KV heads (each would be replicated twice), but the
    # 12 query heads do not split 8 ways (tests/sharded/test_kv_replication.py: those that do).
    c = llama4.Llama4Config.from_hf_dict(dict(config().to_hf_dict(), num_key_value_heads=4,
                                              num_attention_heads=12))
    with pytest.raises(ValueError, match="must divide num_key_value_heads=4"):
        sharding.shard(llama4.init_random(c), mesh(8, 1))
    with pytest.raises(ValueError, match="model_parallel=8"):  # bounds of the wrong head count
        bounds = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64,
                              page_size=8).bounds(config())
        paged_step.make_step_fn(sharding.shard(llama4.init_random(config()), mesh(8, 1)), bounds)


PAGE, PAGES, BUDGET, DECODE_BUCKET = 8, 64, 48, 8


def _serve(model, n, reuse_outputs=False):
    """Chunked prefill (48-token budget) of prompts of 100, 63 and 32 tokens, then greedy
    decode: chunks cross the 32-token chunk boundaries, the 63-token prompt decodes across
    position 64. Returns the logits of every step, the step, and the address of each step's
    logits on the first device."""
    c = model.config
    bounds = EngineConfig(max_num_seqs=4, max_num_batched_tokens=BUDGET, max_model_len=256,
                          page_size=PAGE).bounds(c, model_parallel=n)
    step = paged_step.make_step_fn(model, bounds, reuse_outputs=reuse_outputs)
    spec = paged_step.cache_spec(c, num_pages=PAGES, page_size=PAGE, dtype=model.dtype,
                             model_parallel=n)
    kv = cache.allocate(spec, sharding=None if model.mesh is None else
                        sharding.kv_sharding(model.mesh))
    rng = np.random.default_rng(0)
    free = [int(p) for p in rng.permutation(PAGES)]
    seqs = [dict(tokens=rng.integers(0, c.vocab_size, n_).tolist(), done=0, stop=n_ + 6,
                 pages=[free.pop() for _ in range(16)]) for n_ in (100, 63, 32)]
    outs, addresses = [], set()
    while any(s["done"] < len(s["tokens"]) for s in seqs):
        live = [s for s in seqs if s["done"] < len(s["tokens"])]
        sched, budget = [], BUDGET
        for s in live:
            k = min(len(s["tokens"]) - s["done"], budget)
            if k > 0:
                sched.append((s, k))
                budget -= k
        tokens = DECODE_BUCKET if all(k == 1 for _, k in sched) else BUDGET
        batch = build_step(bounds, tokens, [SeqStep(s["tokens"][s["done"]:s["done"] + k],
                                                    s["done"], s["pages"]) for s, k in sched],
                           num_pages=PAGES)
        logits, kv = step(kv, batch)
        addresses.add(logits.addressable_shards[0].data.unsafe_buffer_pointer())
        # Read a device copy: a host view of the logits would keep their buffer from being
        # donated to the next step (JAX would then copy, at a new address).
        logits = np.asarray(jax.numpy.copy(logits))[:len(sched)]
        outs.append(logits)
        for row, (s, k) in zip(logits, sched):
            s["done"] += k
            if s["done"] == len(s["tokens"]) < s["stop"]:
                s["tokens"].append(int(np.argmax(row)))
    assert [s["done"] for s in seqs] == [s["stop"] for s in seqs]  # all prefilled and decoded
    return outs, step, addresses


@pytest.mark.slow
def test_serving_step_matches_one_device():
    c = config()
    want, ref_step, _ = _serve(llama4.init_random(c, seed=2), 1)
    for tp, ep in [(8, 1), (2, 4), (1, 2)]:
        # The runner's setting: each step writes its logits where the last one did.
        got, step, addresses = _serve(sharding.shard(llama4.init_random(c, seed=2),
                                                     mesh(tp, ep)), tp * ep, reuse_outputs=True)
        assert len(addresses) == 1, (tp, ep, addresses)
        errs = [max_err(a, b) for a, b in zip(got, want)]
        print(f"TP={tp} EP={ep}: {len(errs)} steps, max |logit error| {max(errs):.1e}")
        assert max(errs) < TOL, (tp, ep)
        # Two buckets (prefill, decode): one compile each, none for the mixes of lengths.
        assert step.jitted._cache_size() == ref_step.jitted._cache_size() == 2
