"""The server as the official ``openai`` Python client sees it (issue 23): prompt logprobs
through ``echo``, /tokenize and /detokenize, X-Request-Id, /v1/models, the API key, the
model's generation_config defaults, unknown fields, and chat logprobs' raw token bytes."""

import json
import logging

import httpx
import jax
import numpy as np
import openai
import pytest

from jaxattn.serve.api_server import _chat_logprobs, default_max_request_body_bytes
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.outputs import TokenLogprob

from server_util import LiveServer

MAX_LEN = 256
KEY = "sk-test-key-0123"


def _engine(make_runner, tokenizer):
    runner = make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=64)
    engine = LLMEngine(runner, tokenizer)
    engine.warmup(progress=False)
    return engine


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    engine = _engine(make_runner, tokenizer)
    warm = engine.compile_count
    with LiveServer(engine) as s:
        yield s
    assert engine.compile_count == warm  # nothing compiled while serving


@pytest.fixture(scope="module")
def keyed(make_runner, tokenizer):
    """A server with an API key whose model's generation_config.json says temperature 0."""
    engine = _engine(make_runner, tokenizer)
    engine.generation_defaults = {"temperature": 0.0}
    with LiveServer(engine, api_key=KEY) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _reference(model, prompt):
    lp = np.asarray(jax.nn.log_softmax(model(np.asarray(prompt)[None])[0], axis=-1))
    return lp[np.arange(len(prompt) - 1), prompt[1:]], lp


def test_models_lists_max_model_len(client):
    (m,) = client.models.list().data
    assert m.id == "test-model" and m.object == "model" and m.owned_by == "jaxattn"
    assert m.model_extra["max_model_len"] == MAX_LEN


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs_are_the_prompts(server, client, tokenizer, max_tokens):
    """``echo`` + ``logprobs``: the prompt's tokens come first with their logprobs under the
    model (the first: None), then the completion's; ``max_tokens: 0`` gives the prompt alone."""
    prompt = "The quick brown fox jumps over the lazy dog, again and again and again."
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model="test-model", prompt=prompt, max_tokens=max_tokens,
                                  echo=True, logprobs=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    (c,) = r.choices
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, full = _reference(server.engine.runner.model, ids)
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=1e-4, atol=1e-4)
    for p, top in enumerate(lp.top_logprobs[1:len(ids)]):
        assert 1 <= len(top) <= 2  # keyed by text: two ids may print alike
        np.testing.assert_allclose(max(top.values()), full[p].max(), rtol=1e-4, atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert c.text.startswith(prompt)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert c.text == prompt and c.finish_reason == "length"
    # Streamed: the same text and logprobs.
    stream = client.completions.create(model="test-model", prompt=prompt, max_tokens=max_tokens,
                                       echo=True, logprobs=2, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    assert "".join(ch.text for ch in chunks) == c.text
    streamed = sum((ch.logprobs.token_logprobs for ch in chunks if ch.logprobs), [])
    assert streamed == lp.token_logprobs
    assert sum((ch.logprobs.text_offset for ch in chunks if ch.logprobs), []) == lp.text_offset


def test_echo_prompt_logprobs_with_n_and_token_prompts(server, client):
    """Two token-id prompts, n=2: every choice opens with its prompt and its logprobs."""
    prompts = [[5, 17, 300, 41, 9, 77], list(range(20, 60))]
    r = client.completions.create(model="test-model", prompt=prompts, max_tokens=2, n=2,
                                  echo=True, logprobs=0, temperature=0.5, seed=3)
    assert len(r.choices) == 4
    for c in r.choices:
        ids = prompts[c.index // 2]
        want, _ = _reference(server.engine.runner.model, ids)
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:len(ids)], want, rtol=1e-4,
                                   atol=1e-4)
    stream = client.completions.create(model="test-model", prompt=prompts, max_tokens=2, n=2,
                                       echo=True, logprobs=0, temperature=0.5, seed=3,
                                       stream=True)
    text = {}
    for ch in stream:
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
    assert text == {c.index: c.text for c in r.choices}


def test_max_tokens_zero_needs_echo(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="test-model", prompt="hi", max_tokens=0)


def test_tokenize_detokenize(server, tokenizer):
    with httpx.Client(base_url=server.url) as h:
        text = "Hello there, wörld"
        r = h.post("/tokenize", json={"model": "test-model", "prompt": text}).json()
        assert r == {"count": len(tokenizer.encode(text)), "max_model_len": MAX_LEN,
                     "tokens": tokenizer.encode(text)}
        bare = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                         "return_token_strs": True}).json()
        assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False)
        assert len(bare["token_strs"]) == bare["count"] == len(r["tokens"]) - 1
        messages = [{"role": "user", "content": "Hi"}]
        chat = h.post("/tokenize", json={"messages": messages}).json()
        assert chat["tokens"] == tokenizer.encode_chat(messages)
        no_gen = h.post("/tokenize", json={"messages": messages,
                                           "add_generation_prompt": False}).json()
        assert chat["tokens"][:no_gen["count"]] == no_gen["tokens"]
        assert no_gen["count"] < chat["count"]
        d = h.post("/detokenize", json={"tokens": bare["tokens"]}).json()
        assert d == {"prompt": text}
        # Bad requests: 400 in OpenAI's shape (404 for another model).
        for path, body, status in [
                ("/tokenize", {}, 400), ("/tokenize", {"prompt": "a", "messages": messages}, 400),
                ("/tokenize", {"prompt": 5}, 400), ("/tokenize", {"messages": []}, 400),
                ("/tokenize", b'{"prompt": "\\ud800"}', 400),  # a lone surrogate
                ("/tokenize", {"prompt": "a", "model": "other"}, 404),
                ("/detokenize", {"tokens": [1, -1]}, 400),
                ("/detokenize", {"tokens": [tokenizer.vocab_size]}, 400),
                ("/detokenize", {"tokens": "abc"}, 400), ("/detokenize", {}, 400)]:
            r = (h.post(path, content=body, headers={"content-type": "application/json"})
                 if isinstance(body, bytes) else h.post(path, json=body))
            assert r.status_code == status, (path, body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        info = h.get("/tokenizer_info").json()
        assert info["eos_token"] == tokenizer.eos_token and info["chat_template"]


def test_request_id_header(client):
    raw = client.completions.with_raw_response.create(
        model="test-model", prompt="hi", max_tokens=2, extra_headers={"X-Request-Id": "job-42"})
    assert raw.headers["x-request-id"] == "job-42" and raw.parse().id == "cmpl-job-42"
    raw = client.chat.completions.with_raw_response.create(
        model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "job-42"})  # the same id again: fine
    assert raw.headers["x-request-id"] == "job-42" and raw.parse().id == "chatcmpl-job-42"
    raw = client.completions.with_raw_response.create(model="test-model", prompt="hi",
                                                      max_tokens=1)
    rid = raw.headers["x-request-id"]
    assert len(rid) == 32 and raw.parse().id == f"cmpl-{rid}"
    with pytest.raises(openai.BadRequestError, match="X-Request-Id"):
        client.completions.create(model="test-model", prompt="hi", max_tokens=1,
                                  extra_headers={"X-Request-Id": "x" * 129})


def test_unknown_fields_are_ignored_with_a_warning(client, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxattn.serve"):
        r = client.completions.create(model="test-model", prompt="hi", max_tokens=2,
                                      temperature=0, extra_body={"temprature": 0.5})
    assert r.choices[0].finish_reason in ("length", "stop")
    assert any("temprature" in m for m in caplog.messages)


def test_api_key(keyed):
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="test-model", prompt="hi", max_tokens=1)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0) as good:
        assert good.models.list().data[0].id == "test-model"
        assert good.completions.create(model="test-model", prompt="hi", max_tokens=1).choices
    with httpx.Client(base_url=keyed.url) as h:
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
        for path, body in [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]}),
                           ("/v1/completions", {"prompt": "a"})]:
            r = h.post(path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            r = h.post(path, json=body, headers={"Authorization": "Basic " + KEY})
            assert r.status_code == 401
        auth = {"Authorization": "Bearer " + KEY}
        assert h.post("/tokenize", json={"prompt": "a"}, headers=auth).status_code == 200
        assert h.post("/tokenize", json={"prompt": "a"},
                      headers={"Authorization": "Bearer " + KEY + "x"}).status_code == 401
        # A body over the limit from a caller without the key: 401 first, nothing read.
        assert h.post("/v1/completions", content=b"x" * (9 << 20)).status_code == 401
        assert h.post("/v1/completions", content=b"x" * (9 << 20), headers=auth).status_code == 413
        assert h.post("/detokenize", json={"tokens": [5]},
                      headers={"Authorization": "Bearer \u00e9".encode()}).status_code == 401


def test_generation_config_defaults_apply_when_omitted(keyed):
    """The model says temperature 0: a request without one is greedy (its seed changes
    nothing); a request's own temperature wins."""
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0) as c:
        def run(**kw):
            return c.completions.create(model="test-model", prompt="Once upon a time",
                                        max_tokens=12, extra_body={"ignore_eos": True,
                                                                   "return_token_ids": True},
                                        **kw).choices[0].model_extra["token_ids"]

        greedy = run(temperature=0)
        assert run(seed=1) == run(seed=2) == greedy
        sampled = [run(temperature=1.0, seed=s) for s in (1, 2)]
        assert sampled[0] != sampled[1] and greedy not in sampled


def test_chat_logprob_bytes_are_the_tokens_own(tokenizer):
    """A token that ends inside a UTF-8 character decodes to U+FFFD; its bytes must be its
    own, so that joining every token's bytes gives the text back."""
    text = "naïve café — 日本語 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    lp = _chat_logprobs([TokenLogprob(i, -1.0, ((i, -1.0),)) for i in ids], tokenizer)
    parts = [bytes(e["bytes"]) for e in lp["content"]]
    assert any("\ufffd" in e["token"] for e in lp["content"])  # the case of the bug
    assert b"".join(parts).decode("utf-8") == text
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in lp["content"])


def test_default_body_limit_holds_max_model_len_tokens(tokenizer):
    """A prompt of max_model_len tokens fits the default body limit, as text or as ids."""
    for max_model_len in (256, 8192, 10_000_000):
        limit = default_max_request_body_bytes(max_model_len)
        ids = json.dumps({"prompt": [tokenizer.vocab_size - 1] * min(max_model_len, 10**6)})
        assert len(ids) * max(1, max_model_len // 10**6) < limit
        # Text: the tokenizer's average bytes per token on its own corpus, JSON-escaped.
        sample = "The quick brown fox jumps over the lazy dog. " * 50
        per_token = len(json.dumps(sample)) / len(tokenizer.encode(sample))
        assert per_token * max_model_len < limit


def test_api_key_flag_and_environment(monkeypatch):
    from jaxattn.serve.__main__ import _loopback, build_parser

    monkeypatch.setenv("JAXATTN_API_KEY", "from-env")
    assert build_parser().parse_args([]).api_key == "from-env"
    assert build_parser().parse_args(["--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("JAXATTN_API_KEY")
    args = build_parser().parse_args([])
    assert args.api_key is None and args.host == "127.0.0.1"
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("10.1.2.3") and not _loopback("example.com")


def test_zz_nothing_compiled_after_warmup(server, client):
    """Scoring prompts (every bucket's prompt-logprob head) compiled at warm-up, not since."""
    warm = server.engine.compile_count
    client.completions.create(model="test-model", prompt=list(range(5, 105)), max_tokens=0,
                              echo=True, logprobs=5)
    assert server.engine.compile_count == warm
