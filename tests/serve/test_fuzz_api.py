"""Hostile HTTP traffic against the real server on loopback.

1. schemathesis generates requests from the server's own OpenAPI schema, inside it (positive)
   and outside it (negative): no 5xx, every status and content type documented, every error
   body OpenAI's shape (the schema documents it), schema-invalid bodies refused with a 4xx.
2. Hand-written hostile cases the schema cannot express (malformed and invalid UTF-8 bodies,
   lone surrogates, NaN, enormous prompts, huge stop lists...), each with its exact status.
3. Afterwards: the answers to normal requests are those recorded before any fuzzing, no KV
   page is held, the block manager's invariants hold and nothing compiled.
"""

from __future__ import annotations

import collections
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance,
                                               status_code_conformance)

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

MAX_LEN = 96  # small: a schema-valid request generates at most this many tokens per output
MAX_SEQS = 4
NUM_PAGES = MAX_SEQS * MAX_LEN // 16

# Normal requests whose answers must not change after the fuzzing (greedy, sampled with a
# seed, streamed, n=2, chat).
NORMAL = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True}),
    ("/v1/completions", {"prompt": [7, 8, 9, 10, 11], "max_tokens": 9, "temperature": 0.8,
                         "top_p": 0.9, "top_k": 20, "seed": 3, "n": 2, "ignore_eos": True,
                         "return_token_ids": True, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                              "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
]


def _normal_answers(client: httpx.Client) -> list:
    out = []
    for path, body in NORMAL:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        out.append([(c.get("text") or c["message"]["content"], c.get("token_ids"),
                     c["finish_reason"]) for c in choices])
    with client.stream("POST", "/v1/completions", json=dict(NORMAL[0][1], stream=True)) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    out.append(sum((json.loads(e)["choices"][0]["token_ids"] for e in events[:-1]), []))
    return out


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    runner = make_runner(max_num_seqs=MAX_SEQS, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=NUM_PAGES)
    engine = LLMEngine(runner, tokenizer)
    engine.warmup(progress=False)
    with LiveServer(engine) as s:
        s.warm_compiles = engine.compile_count
        with httpx.Client(base_url=s.url, timeout=60) as c:
            s.baseline = _normal_answers(c)
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.update(base_url=server.url)
    return schema


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
# (path, method, generation mode, examples). The pytest plugin's lazy schema does not run
# under pytest 9, so each operation is driven through its hypothesis strategy directly.
# 100 examples per operation (schemathesis' default; a positive one generates up to
# MAX_LEN tokens per output, so the examples are most of this file's time).
OPERATIONS = [
    ("/v1/completions", "POST", GenerationMode.POSITIVE, 100),
    ("/v1/completions", "POST", GenerationMode.NEGATIVE, 100),
    ("/v1/chat/completions", "POST", GenerationMode.POSITIVE, 100),
    ("/v1/chat/completions", "POST", GenerationMode.NEGATIVE, 100),
    ("/health", "GET", GenerationMode.POSITIVE, 3),
    ("/v1/models", "GET", GenerationMode.POSITIVE, 3),
    ("/metrics", "GET", GenerationMode.POSITIVE, 3),
    ("/tokenize", "POST", GenerationMode.POSITIVE, 50),
    ("/tokenize", "POST", GenerationMode.NEGATIVE, 50),
    ("/detokenize", "POST", GenerationMode.POSITIVE, 50),
    ("/detokenize", "POST", GenerationMode.NEGATIVE, 50),
    ("/tokenizer_info", "GET", GenerationMode.POSITIVE, 3),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,method,mode,examples", OPERATIONS,
                         ids=[f"{m} {p} {g.value}" for p, m, g, _ in OPERATIONS])
def test_schemathesis(api_schema, path, method, mode, examples):
    operation = api_schema[path][method]

    statuses = collections.Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        statuses[case.call_and_validate(checks=CHECKS, timeout=60).status_code] += 1

    run()
    print(f"{method} {path} {mode.value}: statuses {dict(statuses)}")
    if method == "POST":
        assert sum(statuses.values()) == examples
        if mode is GenerationMode.POSITIVE and path.startswith("/v1/"):
            # the engine really ran a good share of them
            assert statuses[200] >= examples // 10, statuses
    else:  # no parameters: hypothesis stops after the one request there is
        assert statuses[200] >= 1


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 404: "not_found_error",
                           405: "invalid_request_error"}[status]
    return err


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, JSON body or raw bytes, expected status, text the error message must contain)
HOSTILE = [
    # lengths and counts
    (CMPL, {"prompt": "x", "max_tokens": 10**30}, 400, "maximum context length"),
    (CMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": MAX_LEN}, 400, "maximum context length"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"prompt": "a " * 500_000}, 400, "maximum context length"),
    (CMPL, {"prompt": [7] * 100_000}, 400, "maximum context length"),
    (CMPL, {"prompt": [[7], [7] * MAX_LEN]}, 400, "maximum context length"),
    (CMPL, {"prompt": "x", "stream": True, "max_tokens": 10**6}, 400, "maximum context length"),
    (CMPL, {"prompt": []}, 400, "empty"),
    (CMPL, {"prompt": [[7, 8], []]}, 400, "empty"),
    (CMPL, {"prompt": [-1]}, 400, "token ids"),
    (CMPL, {"prompt": [2**70]}, 400, "token ids"),
    (CMPL, {"prompt": "x", "n": 1000}, 400, "max_num_seqs"),
    (CMPL, {"prompt": "x", "n": 2**70}, 400, "max_num_seqs"),
    (CMPL, {"prompt": "x", "n": 0}, 400, "n must be"),
    (CMPL, {"prompt": "x", "n": -3}, 400, "n must be"),
    # sampling parameters
    (CMPL, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (CMPL, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (CMPL, b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    (CMPL, b'{"prompt": "x", "temperature": -Infinity}', 400, "temperature"),
    (CMPL, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (CMPL, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (CMPL, b'{"prompt": "x", "top_p": NaN}', 400, "top_p"),
    (CMPL, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (CMPL, {"prompt": "x", "seed": -1}, 400, "seed"),
    (CMPL, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    (CMPL, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (CMPL, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 99}, 400, "logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CMPL, b'{"prompt": "x", "presence_penalty": NaN}', 400, "presence_penalty"),
    (CMPL, {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    (CMPL, {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (CMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    # stop lists
    (CMPL, {"prompt": "x", "stop": ["s"] * 10_000}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop": "s" * 100_000}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (CMPL, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "x", "stop_token_ids": list(range(100_000)) + [-1]}, 400, "stop_token_ids"),
    # wrong types
    (CMPL, {"prompt": 5}, 400, "prompt"),
    (CMPL, {"prompt": {"a": 1}}, 400, "prompt"),
    (CMPL, {"prompt": [1.5]}, 400, "prompt"),
    (CMPL, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "n": "two"}, 400, "n"),
    (CMPL, {"prompt": "x", "stream": [1]}, 400, "stream"),
    (CMPL, {"prompt": "x", "stop": 7}, 400, "stop"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "text"),
    # unknown model, missing route, wrong method
    (CMPL, {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    (CHAT, {"messages": USER, "model": ""}, 404, "does not exist"),
    ("/v1/engines", {"prompt": "x"}, 404, "Not Found"),
    # malformed bodies
    (CMPL, b"{not json", 400, "JSON"),
    (CMPL, b'{"prompt": "x",}', 400, "JSON"),
    (CMPL, b"", 400, "body"),
    (CMPL, b"null", 400, "body"),
    (CMPL, b"[]", 400, "body"),
    (CMPL, b'"prompt"', 400, "body"),
    (CMPL, b"[" * 100_000 + b"]" * 100_000, 400, ""),
    (CMPL, b'{"prompt": "x", "max_tokens": 1e999}', 400, "max_tokens"),
    # invalid UTF-8 and lone surrogates
    (CMPL, b'{"prompt": "\xff\xfe\xc3"}', 400, ""),
    (CMPL, b'{"prompt": "\xed\xa0\x80"}', 400, ""),
    (CMPL, b'{"prompt": "ok \\ud800"}', 400, "Unicode"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "Unicode"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     400, "Unicode"),
    (CMPL, b'{"prompt": "x", "model": "\\ud800"}', 404, "does not exist"),
    (CMPL, b'{"prompt": "x", "logit_bias": {"\\ud800": "x"}}', 400, "logit_bias"),
]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path,body,status,needle", HOSTILE,
                         ids=[f"{i}" for i in range(len(HOSTILE))])
def test_hostile_request(client, path, body, status, needle):
    kw = ({"content": body, "headers": {"content-type": "application/json"}}
          if isinstance(body, bytes) else {"json": body})
    err = _error(client.post(path, **kw), status)
    assert needle.lower() in err["message"].lower(), err


def test_wrong_method_and_content_type(client):
    _error(client.get(CMPL), 405)
    _error(client.post(CMPL, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}),
           400)


@pytest.mark.parametrize("body,check", [
    # extreme but legal: top_k past the vocabulary (and int32) is "off", a lone surrogate in a
    # stop string never matches, an empty text prompt is just the BOS token, stop ids past the
    # vocabulary never match, temperatures that are 0 or infinite in float32.
    ({"prompt": "x", "top_k": 2**40, "temperature": 1, "seed": 1}, None),
    ({"prompt": "x", "stop": ["\ud800"]}, None),
    ({"prompt": ""}, None),
    ({"prompt": [7, 8], "stop_token_ids": [2**70]}, None),
    ({"prompt": "x", "temperature": 1e-300}, None),
    ({"prompt": "x", "temperature": 1e300, "seed": 2}, None),
    ({"prompt": "x", "top_p": 1e-300, "temperature": 1}, None),
    ({"prompt": "x", "max_tokens": None, "n": MAX_SEQS, "ignore_eos": True}, "length"),
    ({"prompt": ["a", "b", "c"], "echo": True, "logprobs": 5}, None),
])
def test_extreme_but_legal_requests_succeed(client, body, check):
    r = client.post(CMPL, content=json.dumps(body).encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert choices and all(c["finish_reason"] in ("stop", "length") for c in choices)
    if check:
        assert all(c["finish_reason"] == check for c in choices)


def test_zz_normal_answers_unchanged_nothing_leaked_nothing_compiled(server, client):
    """Runs last in this module (tests/conftest.py keeps each module on one xdist worker)."""
    assert _normal_answers(client) == server.baseline
    engine = server.engine
    assert client.get("/health").json() == {"status": "ok"}
    assert engine.num_running == engine.num_waiting == 0
    assert engine.bm.num_used_pages == 0
    engine.bm.check()
    assert engine.compile_count == server.warm_compiles


def test_sse_events_are_one_line_for_every_line_splitter():
    """A token may decode to U+0085, U+2028 or U+2029, which JSON leaves unescaped and
    str.splitlines (httpx's iter_lines) treats as line ends: the soak once saw an event cut in
    two. Every event must stay one line and parse back to the same text."""
    from jaxattn.serve.api_server import _sse_event

    text = "a\x85b\u2028c\u2029d\ne\rf\x1cg\x0bh é"
    event = _sse_event({"text": text})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):])["text"] == text
