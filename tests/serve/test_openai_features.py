"""Structured output, tool calls and sampling parameters through the official ``openai``
client, against the real server and the random-weight default model."""

import json

import jsonschema
import openai
import pytest

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

MAX_LEN = 2048  # room for the tools the template writes into the system turn
POOL = 16 * MAX_LEN // 16

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["name", "age", "role", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Oslo", "Paris", "Lima"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
        "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"],
           "get_time": TIME["function"]["parameters"]}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    # The shape of test_api_server's servers: the compiled step comes from the cache.
    runner = make_runner(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=POOL)
    engine = LLMEngine(runner, tokenizer)
    engine.warmup(progress=False)
    with LiveServer(engine) as s:
        s.warm_compiles = engine.compile_count
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model="test-model", messages=kw.pop("messages", MESSAGES),
                                          **kw)


def test_json_schema_output_parses_and_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = _chat(client, response_format=fmt, n=3, seed=1, max_tokens=120)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), PERSON)
    # The completions API takes it too (a vLLM extension).
    r = client.completions.create(model="test-model", prompt="Person:", max_tokens=120, seed=2,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_json_object_output_is_an_object(client):
    """Any JSON object: nothing bounds its strings, so a random model may run out of tokens
    ("length", as OpenAI warns); every output that ends by itself parses."""
    r = _chat(client, response_format={"type": "json_object"}, n=8, seed=0, max_tokens=200)
    stopped = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 2, [c.finish_reason for c in r.choices]
    for c in stopped:
        assert isinstance(json.loads(c.message.content), dict)
    for c in r.choices:
        assert c.message.content.startswith("{")


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_calls_validate(client, parallel):
    counts = []
    for seed in range(3):
        r = _chat(client, tools=[WEATHER, TIME], tool_choice="required", seed=seed,
                  parallel_tool_calls=parallel, max_tokens=600)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        calls = c.message.tool_calls
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        counts.append(len(calls))
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert not parallel or max(counts) > 1, counts


def test_named_tool_choice_calls_that_function(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = _chat(client, tools=[WEATHER, TIME], tool_choice=choice, seed=3, max_tokens=100)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])
    assert r.choices[0].finish_reason == "stop"  # OpenAI's for a named choice


def test_streamed_tool_calls_reassemble_to_the_non_streamed(client):
    for seed in range(3):
        kw = dict(tools=[WEATHER, TIME], tool_choice="required", seed=seed, max_tokens=600,
                  temperature=1.0)
        whole = _chat(client, **kw).choices[0]
        calls, finish, first = {}, None, {}
        for chunk in _chat(client, stream=True, **kw):
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for tc in ch.delta.tool_calls or ():
                    if tc.index not in calls:  # the first delta of a call: id, type, name
                        assert tc.id and tc.type == "function" and tc.function.name
                        first[tc.index] = tc.function.name
                        calls[tc.index] = ""
                    calls[tc.index] += tc.function.arguments or ""
        assert finish == whole.finish_reason
        assert [(first[i], calls[i]) for i in sorted(calls)] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_and_none_tool_choice_and_tool_messages(client, tokenizer):
    # The random model writes text, not a call: it comes back as content.
    for choice in ("auto", "none"):
        c = _chat(client, tools=[WEATHER], tool_choice=choice, seed=0, max_tokens=10).choices[0]
        assert c.message.tool_calls is None and isinstance(c.message.content, str)
    # A conversation with a call and its result is accepted and rendered by the template.
    convo = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = _chat(client, messages=convo, tools=[WEATHER], max_tokens=5, seed=0)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": MESSAGES[0]["content"]},
         {"role": "assistant", "content": "", "tool_calls": [{"function": {
             "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
         {"role": "tool", "content": "sunny, 21 C"}], tools=[WEATHER])
    assert '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}' in text
    assert "ipython<|header_end|>\n\nsunny, 21 C" in text
    assert r.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def _tokens(client, **kw):
    r = client.completions.create(model="test-model", prompt="the clockmaker said",
                                  extra_body={"return_token_ids": True,
                                              **kw.pop("extra_body", {})}, **kw)
    return r.choices[0], r.usage


def test_presence_penalty_stops_repeats_and_logit_bias_forces_a_token(client):
    plain, _ = _tokens(client, temperature=0, max_tokens=40)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # greedy loops on this model
    pen, _ = _tokens(client, temperature=0, max_tokens=40, presence_penalty=2.0)
    assert len(set(pen.token_ids)) == len(pen.token_ids)
    for temperature in (0.0, 1.0):
        forced, _ = _tokens(client, temperature=temperature, max_tokens=8, seed=1,
                            logit_bias={"77": 100})
        assert forced.token_ids == [77] * 8


def test_min_tokens_holds_back_eos_and_min_p_one_is_greedy(client, tokenizer):
    eos = {str(t): 100 for t in tokenizer.eos_token_ids}
    c, usage = _tokens(client, temperature=0, max_tokens=20, logit_bias=eos,
                       extra_body={"min_tokens": 5})
    assert c.finish_reason == "stop" and usage.completion_tokens == 6
    assert c.token_ids[-1] in tokenizer.eos_token_ids
    greedy, _ = _tokens(client, temperature=0, max_tokens=20)
    top, _ = _tokens(client, temperature=1.0, seed=7, max_tokens=20, extra_body={"min_p": 1.0})
    assert top.token_ids == greedy.token_ids


@pytest.mark.parametrize("kw", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-3),
    dict(logit_bias={"abc": 1}), dict(logit_bias={"5": 500}),
    dict(logit_bias={str(i): 1 for i in range(301)}), dict(logit_bias={"100000": 1}),
    dict(extra_body={"min_p": 2}), dict(extra_body={"repetition_penalty": 0}),
    dict(response_format={"type": "xml"}),
    dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
    dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    dict(tool_choice="required"),
    dict(tools=[{"type": "function", "function": {"name": "bad name"}}]),
    dict(tools=[WEATHER], tool_choice="required",
         response_format={"type": "json_object"}),
])
def test_bad_parameters_are_400(client, kw):
    with pytest.raises(openai.BadRequestError):
        _chat(client, max_tokens=4, **kw)


def test_zz_nothing_compiled_after_warmup(server, client):
    _chat(client, max_tokens=2)
    assert server.engine.compile_count == server.warm_compiles
