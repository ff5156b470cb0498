"""Offline generation on the embedded tiny Llama 4: ``jaxattn.LLM`` and ``python -m jaxattn.generate``."""

import json
import os
import subprocess
import sys

import pytest

import jaxattn
from jaxattn.serve import default_model
from jaxattn.serve.generate import content_id

SIZE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)
PROMPTS = ["Hello, my name is", "The quick brown fox", "日本語のテキスト 🚀", "Once upon a time"]


@pytest.fixture(scope="module")
def llm():
    return jaxattn.LLM(**SIZE)


def test_generate_returns_vllm_shaped_results(llm):
    greedy = jaxattn.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS + [[0, 45, 416, 84]], greedy)
    assert len(outs) == 5
    tok = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt)
        o = out.outputs[0]
        assert len(o.token_ids) == 12 and o.finish_reason == "length"
        assert o.text == tok.decode(o.token_ids)
    assert outs[4].prompt is None and outs[4].prompt_token_ids == [0, 45, 416, 84]
    # One prompt alone gives the same tokens as in the batch.
    assert llm.generate(PROMPTS[2], greedy, use_tqdm=False)[0].outputs[0].token_ids == \
        outs[2].outputs[0].token_ids
    sampled = llm.generate(PROMPTS[:2], jaxattn.SamplingParams(n=3, seed=5, max_tokens=6),
                           use_tqdm=False)
    assert all(len(r.outputs) == 3 for r in sampled)
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["ok", "x " * 300], greedy, use_tqdm=False)
    assert llm.engine.stats().num_used_pages == 0


def test_default_model_is_a_real_hf_directory(llm):
    path = default_model.default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert os.path.exists(os.path.join(path, name)), name
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama4_text" and config["vocab_size"] == 1024


@pytest.mark.slow
def test_generate_cli_end_to_end_with_resume(tmp_path, llm):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": p} for p in PROMPTS] + [
        {"id": "chat", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [content_id(r) for r in rows[:4]]  # a line without an id: a hash of its content
    # A previous run finished prompt 0 and was killed while writing prompt 2's line.
    out.write_text(json.dumps({"id": ids[0], "text": "from before", "token_ids": [],
                               "finish_reason": "length", "num_prompt_tokens": 1}) + "\n"
                   + f'{{"id": "{ids[2]}", "te')
    cmd = [sys.executable, "-m", "jaxattn.generate", "--input", str(inp), "--output", str(out),
           "--max-tokens", "8", "--temperature", "0", "--max-model-len", "256",
           "--max-num-seqs", "8", "--max-num-batched-tokens", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4 to run" in r.stderr and "output tok/s" in r.stderr
    assert "RANDOM weights" in r.stderr  # the embedded model says so
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {line["id"]: line for line in lines}
    assert sorted(by_id) == sorted(ids + ["chat"]) and len(lines) == 5
    assert by_id[ids[0]]["text"] == "from before"  # kept, not recomputed
    want = llm.generate(PROMPTS[1:], jaxattn.SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)
    for i, w in zip((1, 2, 3), want):
        assert by_id[ids[i]]["token_ids"] == w.outputs[0].token_ids
    assert len(by_id["chat"]["token_ids"]) <= 5
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 to run" in r.stderr
    assert len(out.read_text().splitlines()) == 5
