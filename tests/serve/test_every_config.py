"""Every valid Llama 4 configuration serves: hypothesis draws small configs (query / KV heads,
head_dim 64 or 128, chunk sizes down to 1 token, MoE layer steps, NoPE intervals, experts,
vocabularies, page sizes) and the serving engine's tokens and logprobs must match the
reference forward (the full-sequence model, no paging) on random prompts that cross several
chunks, under chunked prefill, batched decode and a prefix-cache hit.

The engine runs its attention through the reference or the plan executor (which walks the
planner's work lists, as the kernels do), as on a CPU. Each example compiles an engine, so
the example count is small: the point is the spread of configs, not the count per config.
"""

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from jaxattn.models import llama4
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.llm import LLM
from jaxattn.serve.model_runner import Llama4Runner
from jaxattn.serve.sampling_params import SamplingParams

MAX_LEN, BUDGET, NEW_TOKENS = 96, 32, 4
LOGPROB_TOL = 2e-3  # f32 model; the engine and the reference sum in other orders


@dataclasses.dataclass(frozen=True)
class Case:
    hf: dict  # the Llama4TextConfig dict
    page_size: int
    impl: str
    seed: int

    def __repr__(self):  # what a failing example prints
        keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "attention_chunk_size",
                "num_hidden_layers", "interleave_moe_layer_step", "no_rope_layer_interval",
                "num_local_experts", "vocab_size")
        return (f"Case({', '.join(f'{k}={self.hf[k]}' for k in keys)}, page_size="
                f"{self.page_size}, impl={self.impl!r}, seed={self.seed})")


def _case(heads, kv_heads, head_dim, chunk, layers, moe_step, nope, experts, vocab, page_size,
          impl, seed=0, qk_norm=True):
    return Case(dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, num_local_experts=experts, num_experts_per_tok=1,
        interleave_moe_layer_step=moe_step, no_rope_layer_interval=nope,
        attention_chunk_size=chunk, use_qk_norm=qk_norm, attn_temperature_tuning=True,
        floor_scale=16, initializer_range=0.2, max_position_embeddings=MAX_LEN,
        bos_token_id=None, eos_token_id=[], pad_token_id=None), page_size, impl, seed)


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 5]))
    layers = draw(st.integers(2, 4))
    return _case(
        heads=kv_heads * group, kv_heads=kv_heads, head_dim=draw(st.sampled_from([64, 128])),
        chunk=draw(st.sampled_from([1, 2, 3, 5, 8, 16, 24, 64])), layers=layers,
        moe_step=draw(st.integers(1, layers)), nope=draw(st.integers(2, 4)),
        experts=draw(st.sampled_from([1, 2, 4])), vocab=draw(st.sampled_from([64, 101, 256])),
        page_size=draw(st.sampled_from([4, 8, 16])),
        impl=draw(st.sampled_from(["reference", "executor"])), seed=draw(st.integers(0, 99)),
        qk_norm=draw(st.booleans()))


def _engine(model, case: Case) -> LLMEngine:
    config = EngineConfig(max_model_len=MAX_LEN, max_num_seqs=3, max_num_batched_tokens=BUDGET,
                          page_size=case.page_size, buckets=(8, BUDGET),
                          attention_impl=case.impl)
    runner = Llama4Runner(model, config, num_pages=3 * MAX_LEN // case.page_size)
    return LLMEngine(runner, None, config)  # compiles a bucket when a step first needs it


def _reference_logprobs(model, seqs):
    """log_softmax of the full forward's logits over the sequences padded to one shape, so
    it compiles once per config (causal: the padding after a sequence does not change its
    logits)."""
    ids = np.zeros((3, 80), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return np.asarray(jax.nn.log_softmax(model(ids, impl="reference"), axis=-1))


def _check(model, prompts, outs):
    """Each generated token: the engine's logprob of it equals the reference's, and it is the
    reference's most likely token (greedy), up to ties within the tolerance."""
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    ref = _reference_logprobs(model, seqs)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        got = o.outputs[0]
        assert len(got.token_ids) == NEW_TOKENS
        for j, (tok, lp) in enumerate(zip(got.token_ids, got.logprobs)):
            want = ref[i, len(p) - 1 + j]
            assert abs(lp.logprob - want[tok]) < LOGPROB_TOL, (i, j, lp.logprob, want[tok])
            assert want[tok] > want.max() - LOGPROB_TOL, (i, j, tok, int(want.argmax()))


# The refused checkpoint (6 query / 2 KV heads, 16-token chunks: decode_q 21 > 16),
# and chunks shorter than a page (one token; three tokens, which no page size divides).
@pytest.mark.slow
@example(_case(6, 2, 128, 16, 4, 2, 4, 2, 101, 16, "executor"))
@example(_case(4, 1, 64, 1, 2, 1, 2, 4, 64, 8, "executor"))
@example(_case(10, 2, 64, 3, 3, 2, 3, 1, 256, 4, "reference"))
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_engine_matches_the_reference_forward(case):
    config = llama4.Llama4Config.from_hf_dict(case.hf)
    model = llama4.init_random(config, seed=case.seed)
    engine = _engine(model, case)
    rng = np.random.default_rng(case.seed)
    vocab = config.vocab_size
    # A decode-sized prompt, one crossing several chunks and pages (chunked prefill over 3
    # steps of the 32-token budget), one in between: their decodes run batched with prefills.
    prompts = [rng.integers(0, vocab, n).tolist() for n in (3, 75, 29)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    llm = LLM(engine=engine)
    _check(model, prompts, llm.generate(prompts, params, use_tqdm=False))
    # A prompt sharing the long one's first 50 tokens: its global pages and those of its live
    # chunk come from the prefix cache where the pools still hold them (the hit is shorter,
    # or none, where a live-chunk page went back to the pool and was reused).
    shared = [prompts[1][:50] + rng.integers(0, vocab, 9).tolist()]
    _check(model, shared, llm.generate(shared, params, use_tqdm=False))
    assert engine.bm.num_used_pages == 0
    engine.bm.check()
