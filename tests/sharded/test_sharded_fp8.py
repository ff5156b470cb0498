"""The FP8 KV cache on a mesh: its scale pools are split by KV head like the values, and a
tensor-parallel engine gives the single-device FP8 engine's tokens (a token's scale is its
own head's, so splitting heads changes nothing stored)."""

import numpy as np
import pytest

from jaxattn.models import llama4
from jaxattn.serve import default_model
from jaxattn.serve.llm import LLM
from jaxattn.serve.sampling_params import SamplingParams

from sharded_cases import BASE

SHAPE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, page_size=32,
             kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model"))
    vocab = default_model.build_tokenizer(path)
    llama4.save(llama4.init_random(llama4.Llama4Config.from_hf_dict(dict(BASE, vocab_size=vocab)),
                                   seed=5), path)
    return path


def _tokens(llm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(6, 1000, n).tolist() for n in (5, 100, 33, 70)]
    params = [SamplingParams(temperature=0, max_tokens=8) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=8) for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_tensor_parallel_fp8_cache_equals_one_device(model_dir):
    alone = _tokens(LLM(model_dir, **SHAPE))
    llm = LLM(model_dir, tensor_parallel_size=4, **SHAPE)
    runner = llm.engine.runner
    kv = runner._kv
    assert runner.spec.quantized and len(kv.k_scale) == len(kv.k)
    # [P, Hkv, page_size]: each of the 4 devices holds its KV heads' scales.
    shard = kv.k_scale[0].addressable_shards[0].data.shape
    assert shard[1] == kv.k_scale[0].shape[1] // 4 and shard[0] == kv.k_scale[0].shape[0]
    assert _tokens(llm) == alone
    assert llm.engine.stats().num_used_pages == 0
