"""Parsing Llama 4's tool-call forms and streaming them as OpenAI deltas."""

import json

import pytest

from jaxattn.serve import tool_calls as tc


@pytest.mark.parametrize("text,want", [
    ('{"name":"f","parameters":{"a":1}}', [("f", '{"a":1}')]),
    ('{"name": "f", "parameters": {"s": "};{"}}; {"name": "g", "parameters": {}}',
     [("f", '{"s": "};{"}'), ("g", "{}")]),
    ('<|python_start|>{"name": "f", "parameters": {"a": [1, {"b": 2}]}}<|python_end|>',
     [("f", '{"a": [1, {"b": 2}]}')]),
    ('{"parameters": {"a": 1}, "name": "f"}', [("f", '{"a": 1}')]),  # keys in another order
    ('[get_weather(city="Oslo", days=3), now()]',
     [("get_weather", '{"city": "Oslo", "days": 3}'), ("now", "{}")]),
    ('[{"name": "f", "arguments": {"x": null}}]', [("f", '{"x": null}')]),
])
def test_parse_json_and_pythonic_forms(text, want):
    assert [(c.name, c.arguments) for c in tc.parse(text)] == want


@pytest.mark.parametrize("text", ["hello", '{"name": "f"', '{"a": 1}', "[f(x)]", "[1, 2]",
                                  '{"name":"f","parameters":{"a":1}} trailing words'])
def test_not_calls_are_none(text):
    assert tc.parse(text) is None


def test_constrained_stream_reassembles_in_any_pieces():
    text = '{"name":"f","parameters":{"a":[1,2],"b":"x\\"}"}};{"name":"g","parameters":{}}'
    for size in (1, 2, 5, len(text)):
        s, names, args = tc.ToolCallStream(constrained=True), {}, {}
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            for d in s.feed(piece, final=k == len(pieces) - 1):
                (call,) = d["tool_calls"]
                if "id" in call:
                    names[call["index"]] = call["function"]["name"]
                args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
        assert [(names[i], args[i]) for i in sorted(args)] == [
            (c.name, c.arguments) for c in tc.parse(text)]
        ids = [c.id for c in s.calls]
        assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_auto_stream_holds_a_call_and_streams_text():
    s = tc.ToolCallStream(constrained=False)
    assert s.feed('{"name": "f", ', final=False) == []
    out = s.feed('"parameters": {"a": 1}}', final=True)
    assert out[0]["tool_calls"][0]["function"]["name"] == "f"
    assert json.loads(out[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 1}
    s = tc.ToolCallStream(constrained=False)
    assert s.feed("Hello", final=False) == [{"content": "Hello"}]
    assert s.feed(" there", final=True) == [{"content": " there"}]
    s = tc.ToolCallStream(constrained=False)  # looked like a call, was not: sent as content
    assert s.feed("{oops", final=False) == []
    assert s.feed("}", final=True) == [{"content": "{oops}"}]


def test_required_grammar_embeds_each_schema():
    fns = tc.validate_tools([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}])
    assert tc.resolve_choice("required", fns) == "required"
    assert tc.resolve_choice({"type": "function", "function": {"name": "f"}}, fns) == "f"
    g = tc.call_grammar(fns, "required", parallel=True)
    assert '"const": "f"' in g.lark and '(";" call)*' in g.lark
    for bad in ("sometimes", {"type": "function", "function": {"name": "g"}}):
        with pytest.raises(ValueError):
            tc.resolve_choice(bad, fns)
