"""The OpenAI-compatible server, run for real under uvicorn on loopback, with a real HTTP client."""

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

MAX_LEN = 256
POOL = 16 * MAX_LEN // 16  # pages: 16 sequences of MAX_LEN


class SlowRunner:
    """The runner with an optional pause per step (to hold a request open deterministically)."""

    def __init__(self, inner):
        self.inner, self.delay = inner, 0.0

    def __getattr__(self, name):  # everything but step is the inner runner's
        return getattr(self.inner, name)

    def step(self, seqs, rows, **kw):
        if self.delay:
            time.sleep(self.delay)
        return self.inner.step(seqs, rows, **kw)


def _server(make_runner, tokenizer, num_pages):
    """A server whose engine uses ``num_pages`` of a POOL-page runner (one shape for both
    servers of this file: the second loads the first's compiled step from the cache)."""
    runner = SlowRunner(make_runner(max_num_seqs=16, max_num_batched_tokens=64,
                                    max_model_len=MAX_LEN, num_pages=POOL))
    engine = LLMEngine(runner, tokenizer, num_pages=num_pages)
    engine.warmup(progress=False)
    return LiveServer(engine)


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    with _server(make_runner, tokenizer, num_pages=POOL) as s:
        s.warm_compiles = s.engine.compile_count
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _metrics(client) -> dict:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r'^(jaxattn_\w+)(\{[^}]*\})? ([-+0-9.eEinfa]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _metric(client, name) -> float:
    return sum(v for k, v in _metrics(client).items() if k.split("{")[0] == name)


def _idle(client, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (_metric(client, "jaxattn_kv_pages_used") == 0
                and _metric(client, "jaxattn_num_requests_running") == 0
                and _metric(client, "jaxattn_num_requests_waiting") == 0):
            return True
        time.sleep(0.05)
    return False


def _prompt(rng, n):
    return rng.integers(6, 1000, n).tolist()


def _alone(client, prompt, max_tokens):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "return_token_ids": True,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _sse(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    (m,) = client.get("/v1/models").json()["data"]
    assert m["id"] == "test-model" and m["max_model_len"] == MAX_LEN


def test_completion_and_chat(client, tokenizer):
    r = client.post("/v1/completions", json={"model": "test-model", "prompt": "Hello there",
                                             "max_tokens": 5, "temperature": 0, "logprobs": 2,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (c,) = body["choices"]
    assert c["finish_reason"] == "length" and len(c["logprobs"]["tokens"]) == 5
    assert all(1 <= len(t) <= 2 for t in c["logprobs"]["top_logprobs"])  # keyed by text
    n_prompt = len(tokenizer.encode("Hello there"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5,
                             "total_tokens": n_prompt + 5}
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "n": 2, "logprobs": True, "top_logprobs": 1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == body["choices"][1]["message"]["content"]
    assert len(body["choices"][0]["logprobs"]["content"]) == 4
    assert body["usage"]["completion_tokens"] == 8


def test_streaming_equals_non_streaming(client):
    req = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8, "seed": 7,
           "return_token_ids": True, "ignore_eos": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    with client.stream("POST", "/v1/completions",
                       json=dict(req, stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r.iter_lines())
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []
    body = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(c["text"] for c in body) == whole["text"]
    assert sum((c["token_ids"] for c in body), []) == whole["token_ids"]
    assert body[-1]["finish_reason"] == "length"

    chat = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10,
            "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json=dict(chat, stream=True)) as r:
        chunks = _sse(r.iter_lines())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_32_concurrent_requests_equal_each_alone(server, client):
    """Mixed prompt lengths (some over the 64-token step budget: chunked prefill) and output
    lengths, half of them streamed, all at once: each equals the request run alone."""
    rng = np.random.default_rng(0)
    reqs = [(_prompt(rng, int(rng.integers(1, 160))), int(rng.integers(1, 60))) for _ in range(32)]

    async def one(c, i, prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, "ignore_eos": True}
        if i % 2:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        async with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        return sum((ch["choices"][0]["token_ids"] for ch in _sse(lines)), [])

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, i, p, m) for i, (p, m) in enumerate(reqs)))

    together = asyncio.run(all_at_once())
    alone = [_alone(client, p, m) for p, m in reqs]
    assert together == alone
    assert [len(t) for t in together] == [m for _, m in reqs]
    assert _idle(client)


def test_too_long_prompt_is_a_400_and_disturbs_nothing(server, client):
    rng = np.random.default_rng(1)
    prompt = _prompt(rng, 30)
    want = _alone(client, prompt, 40)
    server.engine.runner.delay = 0.002
    try:
        with httpx.Client(base_url=server.url, timeout=60) as other:
            with other.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True,
                    "return_token_ids": True, "ignore_eos": True}) as r:
                lines = r.iter_lines()
                first = next(lines)
                for bad in ({"prompt": _prompt(rng, MAX_LEN), "max_tokens": 1},
                            {"prompt": _prompt(rng, 100), "max_tokens": MAX_LEN - 50}):
                    resp = client.post("/v1/completions", json=bad)
                    assert resp.status_code == 400
                    err = resp.json()["error"]
                    assert "maximum context length is 256" in err["message"]
                    assert err["type"] == "invalid_request_error"
                chunks = _sse([first, *lines])
    finally:
        server.engine.runner.delay = 0.0
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == want
    assert _idle(client)


def test_client_disconnect_aborts_and_frees_pages(server, client):
    aborted = _metric(client, "jaxattn_request_success_total")
    server.engine.runner.delay = 0.01  # 200 tokens would take 2 s: the disconnect comes first
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={
                    "prompt": "A long story:", "max_tokens": 200, "stream": True,
                    "ignore_eos": True}) as r:
                lines = r.iter_lines()
                next(lines)
                assert _metric(client, "jaxattn_kv_pages_used") > 0
        # A non-streaming request whose client gives up (times out) is aborted too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", timeout=0.3,
                       json={"prompt": "Another one:", "max_tokens": 200, "ignore_eos": True})
        assert _idle(client, timeout=10)
    finally:
        server.engine.runner.delay = 0.0
    m = _metrics(client)
    assert m['jaxattn_request_success_total{finished_reason="abort",model_name="test-model"}'] >= 2
    assert _metric(client, "jaxattn_request_success_total") - aborted == 2  # nothing else ran


def test_kv_exhaustion_preempts_and_outputs_do_not_change(make_runner, tokenizer, client):
    """A second server whose pool holds one max-length sequence (16 pages): 8 concurrent
    requests of 6-7 pages each force preemption; every one finishes with the output it has
    on the roomy server."""
    rng = np.random.default_rng(2)
    reqs = [(_prompt(rng, int(rng.integers(30, 50))), 60) for _ in range(8)]
    want = [_alone(client, p, m) for p, m in reqs]
    with _server(make_runner, tokenizer, num_pages=MAX_LEN // 16) as small:
        async def run():
            async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json={
                    "prompt": p, "max_tokens": m, "temperature": 0, "return_token_ids": True,
                    "ignore_eos": True})
                    for p, m in reqs))
            return [r.json()["choices"][0]["token_ids"] for r in rs]

        got = asyncio.run(run())
        with httpx.Client(base_url=small.url) as c:
            assert _metric(c, "jaxattn_num_preemptions_total") > 0
            assert _idle(c)
    assert got == want


def test_metrics_present_and_moving(client):
    before = _metrics(client)
    for name in ("jaxattn_num_requests_running", "jaxattn_num_requests_waiting",
                 "jaxattn_kv_pages_used", "jaxattn_kv_pages_free",
                 "jaxattn_kv_chunked_pages_used",
                 "jaxattn_generation_tokens_per_second", "jaxattn_compiles",
                 "jaxattn_engine_device_wait_seconds",
                 "jaxattn_time_to_first_token_seconds_count",
                 "jaxattn_inter_token_latency_seconds_count"):
        assert any(k.split("{")[0] == name for k in before), name
    r = client.post("/v1/completions", json={"prompt": "Count:", "max_tokens": 6,
                                             "ignore_eos": True})
    assert r.status_code == 200
    after = _metrics(client)
    key = lambda n: n + '{model_name="test-model"}'
    assert after[key("jaxattn_generation_tokens_total")] == before[key("jaxattn_generation_tokens_total")] + 6
    assert after[key("jaxattn_time_to_first_token_seconds_count")] == before[key("jaxattn_time_to_first_token_seconds_count")] + 1
    assert after[key("jaxattn_inter_token_latency_seconds_count")] == before[key("jaxattn_inter_token_latency_seconds_count")] + 5
    assert after[key("jaxattn_generation_tokens_per_second")] > 0
    assert after[key("jaxattn_kv_pages_free")] == 256
    # the engine waited on the device for the request's steps' results
    assert after[key("jaxattn_engine_device_wait_seconds")] > before[key("jaxattn_engine_device_wait_seconds")]


@pytest.mark.parametrize("path,body,status", [
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3.0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"prompt": [10**7]}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/nothing", {}, 404),
])
def test_errors_have_openai_shape(client, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_zz_nothing_compiled_after_warmup(server, client):
    """Runs last in this module: all the traffic above compiled nothing new."""
    assert _metric(client, "jaxattn_compiles") == server.warm_compiles
    assert _idle(client)
