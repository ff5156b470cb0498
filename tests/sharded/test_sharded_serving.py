"""Sharded serving end to end: the engine, ``jaxattn.LLM`` and the CLIs on a mesh give the
single-device outputs; configurations that cannot run are refused with one line."""

import json
import os
import sys

import numpy as np
import pytest

from jaxattn.serve import generate
from jaxattn.serve.llm import LLM
from jaxattn.models import llama4
from jaxattn.serve import default_model
from jaxattn.serve.__main__ import build_parser
from jaxattn.serve.cli import start_engine
from jaxattn.serve.data_parallel import DataParallelEngine
from jaxattn.serve.sampling_params import SamplingParams

from sharded_cases import BASE

SHAPE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, page_size=8)
FLAGS = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
         "--page-size", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The sharding test config (16/8 heads, 8 experts) with the embedded model's tokenizer."""
    path = str(tmp_path_factory.mktemp("model"))
    vocab = default_model.build_tokenizer(path)
    config = llama4.Llama4Config.from_hf_dict(dict(BASE, vocab_size=vocab))
    llama4.save(llama4.init_random(config, seed=5), path)
    return path


def _prompts():
    # 100 and 70 tokens: chunked prefill (32-token budget) across the 32-token chunk boundaries.
    rng = np.random.default_rng(0)
    return [rng.integers(6, 1000, n).tolist() for n in (5, 100, 33, 70, 64, 12)]


def _params():
    return [SamplingParams(temperature=0, max_tokens=8) if i % 2 else
            SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=8) for i in range(6)]


def _tokens(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _params(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(model_dir):
    return _tokens(LLM(model_dir, **SHAPE))


@pytest.mark.slow
def test_llm_tensor_expert_and_data_parallel(model_dir, alone):
    """DP=2 replicas, each TP=2 x EP=2 (4 devices): the same tokens as one device; nothing
    compiles after warm-up; every page is freed."""
    llm = LLM(model_dir, tensor_parallel_size=2, expert_parallel_size=2, data_parallel_size=2,
              **SHAPE)
    engine = llm.engine
    assert isinstance(engine, DataParallelEngine) and engine.num_replicas == 2
    meshes = [r.runner.mesh for r in engine.replicas]
    assert [m.size for m in meshes] == [4, 4]
    assert not set(meshes[0].devices.flat) & set(meshes[1].devices.flat)
    warm = engine.compile_count
    assert _tokens(llm) == alone
    assert engine.compile_count == warm
    assert engine.stats().num_used_pages == 0
    assert all(r.num_steps > 0 for r in engine.replicas)  # both replicas served requests


@pytest.mark.slow
def test_prompt_logprobs_on_a_mesh(model_dir):
    """Prompt logprobs from TP=4 x EP=2 (the LM head's vocabulary split 8 ways, the hidden
    states gathered out of shard_map) equal one device's."""
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:4]]
    one = LLM(model_dir, **SHAPE).generate(prompts, params, use_tqdm=False)
    got = LLM(model_dir, tensor_parallel_size=4, expert_parallel_size=2, **SHAPE).generate(
        prompts, params, use_tqdm=False)
    for a, b in zip(one, got):
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) and b.prompt_logprobs[0] is None
        np.testing.assert_allclose([t.logprob for t in b.prompt_logprobs[1:]],
                                   [t.logprob for t in a.prompt_logprobs[1:]], rtol=1e-4,
                                   atol=1e-5)
        assert [t.top[0][0] for t in b.prompt_logprobs[1:]] == [
            t.top[0][0] for t in a.prompt_logprobs[1:]]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_generate_cli_tensor_parallel(model_dir, alone, tmp_path):
    """``python -m jaxattn.generate -tp 8`` (one KV head per device)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for i, (p, sp) in enumerate(zip(_prompts(), _params())):
            row = {"id": i, "prompt_token_ids": p, "max_tokens": sp.max_tokens,
                   "temperature": sp.temperature}
            if sp.temperature:
                row.update(top_p=sp.top_p, seed=sp.seed)
            f.write(json.dumps(row) + "\n")
    assert generate.main(["--model", model_dir, "--tensor-parallel-size", "8", *FLAGS,
                          "--input", str(inp), "--output", str(out)]) == 0
    with open(out) as f:
        got = {r["id"]: r["token_ids"] for r in map(json.loads, f)}
    assert [got[i] for i in range(6)] == alone


def _refusal(model_dir, *flags):
    args = build_parser().parse_args(["--model", model_dir, *FLAGS, *flags])
    with pytest.raises(SystemExit) as e:
        start_engine(args)
    return str(e.value.code)


def test_impossible_configurations_are_refused_in_one_line(model_dir):
    msg = _refusal(model_dir, "--tensor-parallel-size", "3")
    assert msg.startswith("error: ") and "must divide num_key_value_heads=8" in msg
    msg = _refusal(model_dir, "--tensor-parallel-size", "4", "--data-parallel-size", "4")
    assert "needs 16 devices; 8 are available" in msg
    msg = _refusal(model_dir, "--tensor-parallel-size", "2", "--device-memory", "64KiB")
    assert "of weights per device exceed the 0.0 GiB XLA may use" in msg
    # Weights fit but the KV cache cannot hold one 256-token sequence next to a step.
    msg = _refusal(model_dir, "--tensor-parallel-size", "8", "--device-memory", "4GiB",
                   "--kv-cache-memory", "16KiB")
    assert "cannot hold one sequence of --max-model-len 256" in msg and "\n" not in msg


def test_plan_memory_flag_prints_and_exits(model_dir, capsys):
    assert _refusal(model_dir, "-tp", "8", "--device-memory", "4GiB", "--plan-memory") == "0"
    out = capsys.readouterr().out
    assert "TP=8 EP=1 DP=1 (8 devices)" in out and "verdict      fits" in out
    assert _refusal(model_dir, "-tp", "8", "--device-memory", "1MiB", "--plan-memory") == "1"


def test_http_server_over_data_parallel_replicas(model_dir, alone):
    """The OpenAI server over DP=2 x TP=2 replicas: concurrent greedy requests give the
    single-device tokens; the metrics add up both replicas; nothing compiles while serving."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from jaxattn.serve.config import EngineConfig
    from jaxattn.serve.engine import LLMEngine
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from server_util import LiveServer  # tests/serve/server_util.py

    allocator_before = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR")
    engine = LLMEngine.from_config(EngineConfig(model=model_dir, tensor_parallel_size=2,
                                                data_parallel_size=2, **SHAPE))
    # The engine leaves the allocator to XLA's default (serve/allocator.py says why).
    assert os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == allocator_before
    engine.warmup(progress=False)
    warm = engine.compile_count
    greedy = [(p, want) for i, (p, want) in enumerate(zip(_prompts(), alone)) if i % 2]
    with LiveServer(engine) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        def ask(prompt):
            r = client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(greedy)) as pool:
            got = list(pool.map(ask, [p for p, _ in greedy]))
        metrics = client.get("/metrics").text
    assert got == [want for _, want in greedy]
    assert engine.compile_count == warm and engine.stats().num_used_pages == 0
    free = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith(("jaxattn_kv_pages_free ", "jaxattn_kv_pages_free{"))]
    assert free == [engine.stats().num_free_pages] == [
        sum(r.stats().num_free_pages for r in engine.replicas)]
    assert all(r.num_steps > 0 for r in engine.replicas)
