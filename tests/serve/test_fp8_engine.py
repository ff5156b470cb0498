"""The CPU engine serving an FP8-quantised model end to end (``quantization="fp8"``)."""

import argparse

import numpy as np
import pytest

import jaxattn
from jaxattn.kernels import fp8
from jaxattn.serve.config import EngineConfig, add_engine_args, config_from_args

SIZE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def llm():
    return jaxattn.LLM(quantization="fp8", **SIZE)


def test_engine_serves_the_fp8_model_as_its_full_forward(llm):
    """Greedy tokens through the paged engine (chunked prefill over 32-token steps, then
    decode) equal greedy decoding with the same FP8 model's full-sequence forward."""
    model = llm.engine.runner.model
    experts = next(layer.feed_forward.experts for layer in model.model.layers
                   if hasattr(layer.feed_forward, "experts"))
    assert experts.gate_proj[...].dtype == fp8.DTYPE
    ids = [0] + list(range(40, 110))  # 71 tokens: three prefill chunks
    greedy = jaxattn.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = llm.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids
    seq = np.zeros((1, len(ids) + 6), np.int32)
    seq[0, :len(ids)] = ids
    for i in range(6):
        n = len(ids) + i
        seq[0, n] = int(np.argmax(np.asarray(model(seq)[0, n - 1])))
    assert list(got) == seq[0, len(ids):].tolist()
    assert llm.engine.stats().num_used_pages == 0


def test_quantization_flag_and_validation():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert config_from_args(p.parse_args(["--quantization", "fp8"])).quantization == "fp8"
    assert config_from_args(p.parse_args([])).quantization is None
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int8")
