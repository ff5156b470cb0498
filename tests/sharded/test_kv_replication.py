"""More devices than KV heads: each KV head is replicated on the devices whose query heads
read it (as vLLM does) instead of the split being refused. The forwards on such meshes equal
the single-device ones, each device holds only its KV head (weights and pages), the loader
reads each device's rows from its KV head's, ``save`` writes one copy back, and the memory
planner counts the replicas."""

import jax
import numpy as np
import pytest

from jaxattn import parallel
from jaxattn.models import llama4
from jaxattn.models.llama4 import sharding
from jaxattn.serve import memory_plan

from sharded_cases import BASE, max_err, mesh
from test_sharded_model import TOL, _serve

# (KV heads, tensor, expert): 16 query heads throughout.
CASES = [(2, 4, 1), (1, 8, 1), (2, 8, 1), (4, 8, 1), (2, 2, 4)]


def _config(kv_heads, **kw):
    return llama4.Llama4Config.from_hf_dict(dict(BASE, num_key_value_heads=kv_heads, **kw))


@pytest.mark.parametrize("kv_heads,tp,ep", CASES)
def test_full_forward_matches_one_device(kv_heads, tp, ep):
    c = _config(kv_heads, attention_bias=kv_heads == 2)  # biases are replicated rows too
    ids = np.random.default_rng(kv_heads).integers(0, c.vocab_size, (2, 70)).astype(np.int32)
    want = np.asarray(llama4.init_random(c, seed=1)(ids))
    model = sharding.shard(llama4.init_random(c, seed=1), mesh(tp, ep))
    n = tp * ep
    assert llama4.local_heads(c, n) == (16 // n, 1)
    k = model.model.layers[0].self_attn.k_proj.weight[...]
    assert k.shape == (n * 16, 64)  # n heads of 16 rows on the mesh: one per device
    assert {s.data.shape for s in k.addressable_shards} == {(16, 64)}
    # Device i holds KV head i // (n / kv_heads), the one its query heads read.
    ref_k = np.asarray(llama4.init_random(c, seed=1).model.layers[0].self_attn.k_proj.weight[...])
    for i, d in enumerate(model.mesh.devices.flat):
        shard = next(s.data for s in k.addressable_shards if s.device == d)
        head = i // (n // kv_heads)
        np.testing.assert_array_equal(np.asarray(shard), ref_k[head * 16:(head + 1) * 16])
    err = max_err(model(ids), want)
    print(f"KV heads {kv_heads}, TP={tp} EP={ep}: max |logit error| {err:.1e}")
    assert err < TOL


def test_init_random_on_the_mesh_draws_each_kv_head_once():
    c = _config(2)
    model = sharding.init_random(c, mesh(8, 1), seed=3, dtype=np.float32)
    k = np.asarray(model.model.layers[1].self_attn.v_proj.weight[...]).reshape(8, 16, 64)
    for head in range(8):  # replicas of one KV head agree; the two KV heads differ
        np.testing.assert_array_equal(k[head], k[head // 4 * 4])
    assert not np.array_equal(k[0], k[4])


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,tp,ep", [(2, 4, 1), (1, 8, 1), (2, 2, 4)])
def test_serving_step_matches_one_device(kv_heads, tp, ep):
    """Chunked prefill across chunk boundaries and decode over a paged cache whose pools hold
    one (replicated) KV head per device, step by step against the one-device step."""
    c = _config(kv_heads)
    want = _serve(llama4.init_random(c, seed=2), 1)[0]
    got = _serve(sharding.shard(llama4.init_random(c, seed=2), mesh(tp, ep)), tp * ep)[0]
    errs = [max_err(a, b) for a, b in zip(got, want)]
    print(f"KV heads {kv_heads}, TP={tp} EP={ep}: {len(errs)} steps, max error {max(errs):.1e}")
    assert max(errs) < TOL


def test_load_reads_each_kv_head_per_device_and_save_writes_one_copy(tmp_path):
    c = _config(2, attention_bias=True)
    ref = llama4.init_random(c, seed=4)
    llama4.save(ref, tmp_path / "a")
    model = llama4.load(tmp_path / "a", mesh=mesh(8, 1))
    b = model.model.layers[2].self_attn.k_proj.bias[...]
    assert b.shape == (128,) and {s.data.shape for s in b.addressable_shards} == {(16,)}
    ids = np.arange(40, dtype=np.int32)[None] % c.vocab_size
    assert max_err(model(ids), ref(ids)) < TOL
    llama4.save(model, tmp_path / "b")  # the sharded model writes the checkpoint's layout
    again = llama4.load(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_memory_plan_counts_the_replicas():
    c = _config(2)
    pc8, pc2 = parallel.ParallelConfig(tensor=8), parallel.ParallelConfig(tensor=2)
    # One KV head per device either way: at TP=8 a replica, at TP=2 a split.
    assert memory_plan.kv_bytes_per_token(c, pc8, "float32") == \
        memory_plan.kv_bytes_per_token(c, pc2, "float32") == 4 * 2 * 16 * 4
    # Weights: a replicated KV head costs a device what an own KV head would (8 KV heads
    # split 8 ways), i.e. one head of K/V projection rows per device, not both heads.
    assert memory_plan.weight_bytes(c, pc8, "float32") == \
        memory_plan.weight_bytes(_config(8), pc8, "float32")
    plan = memory_plan.for_engine(c, memory_plan.EngineConfig(tensor_parallel_size=8,
                                                              max_model_len=256),
                                  dtype="float32", usable="8GiB")
    # The one global layer: K and V of one (replicated) head per device.
    assert plan is not None and plan.fits and plan.kv_bytes_per_token == 2 * 16 * 4


def test_splits_that_cannot_replicate_are_refused():
    c = _config(4, num_attention_heads=12)  # 3 query heads per KV head
    with pytest.raises(ValueError, match="must divide num_key_value_heads=4 or be a multiple"):
        sharding.check(c, mesh(8, 1))  # 12 query heads do not split 8 ways
    with pytest.raises(ValueError, match="multiple of them"):
        llama4.local_heads(_config(4), 6)  # 6 devices: neither a divisor nor a multiple of 4


@pytest.mark.slow
def test_llm_on_more_devices_than_kv_heads(tmp_path):
    """``LLM(-tp 4 -ep 2)`` on a 2-KV-head checkpoint (each KV head on 4 devices): the
    single-device engine's tokens, greedy and sampled, prompts across chunk boundaries."""
    from jaxattn.serve import default_model
    from jaxattn.serve.llm import LLM
    from jaxattn.serve.sampling_params import SamplingParams

    vocab = default_model.build_tokenizer(str(tmp_path))
    llama4.save(llama4.init_random(_config(2, vocab_size=vocab), seed=5), tmp_path)
    shape = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(6, 1000, n).tolist()} for n in (5, 70, 33)]
    params = [SamplingParams(temperature=0, max_tokens=6),
              SamplingParams(temperature=0.8, seed=1, max_tokens=6),
              SamplingParams(temperature=0, max_tokens=6)]

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    llm = LLM(str(tmp_path), tensor_parallel_size=4, expert_parallel_size=2, **shape)
    assert llm.engine.runner.bounds.num_kv_heads == 1
    assert tokens(llm) == tokens(LLM(str(tmp_path), **shape))


def test_fp8_checkpoint_and_fp8_init_replicate_kv_heads(tmp_path):
    """A compressed-tensors checkpoint with FP8 attention (``weight`` + ``weight_scale`` per
    output row, dequantised on load) on 4 devices with 2 KV heads: each device's K/V rows and
    scales come from its KV head's; and FP8 attention drawn on the mesh has equal replicas."""
    import os
    import sys

    import jax.numpy as jnp

    from jaxattn.models.llama4.quantization import Fp8Scheme

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models", "llama4"))
    from llama4_fixtures import checkpoint, expected, write_compressed_tensors

    write_compressed_tensors(checkpoint("moe_dense"), str(tmp_path), quantize_attention=True)
    one = llama4.load(tmp_path, dtype=jnp.float32)
    four = llama4.load(tmp_path, dtype=jnp.float32, mesh=mesh(4, 1))
    assert llama4.kv_replicas(one.config, 4) == 2
    for proj in ("k_proj", "v_proj"):
        want = np.asarray(getattr(one.model.layers[0].self_attn, proj).weight[...])  # [2*16, 64]
        got = getattr(four.model.layers[0].self_attn, proj).weight[...]
        np.testing.assert_array_equal(np.asarray(got), np.repeat(want.reshape(2, 16, 64), 2, 0)
                                      .reshape(64, 64))
    ids = expected("moe_dense")["input_ids"][:, :64]
    a, b = np.asarray(one(ids), np.float64), np.asarray(four(ids), np.float64)
    # The experts' FP8 activations are quantised per device over its own K slice.
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05

    c = _config(2)
    q = sharding.init_random(c, mesh(8, 1), seed=0, dtype=jnp.bfloat16,
                             fp8=Fp8Scheme(attention=True))
    attn = q.model.layers[0].self_attn.k_proj
    w = np.asarray(attn.weight[...].astype(jnp.float32)).reshape(8, 16, 64)
    s = np.asarray(attn.weight_scale[...]).reshape(8, 16)
    for head in range(8):
        np.testing.assert_array_equal(w[head], w[head // 4 * 4])
        np.testing.assert_array_equal(s[head], s[head // 4 * 4])
