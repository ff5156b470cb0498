"""Tool calling for the chat API: the grammar that enforces a call, and parsing calls back.

Llama 4 writes a tool call in one of two forms (its chat templates show both):

* JSON: ``{"name": "get_weather", "parameters": {"city": "Oslo"}}``, several separated by
  ``;`` (the form the embedded model's template renders and that constrained decoding
  produces: its arguments are JSON, so they validate against the function's schema as
  they are);
* pythonic: ``[get_weather(city="Oslo"), get_time(zone="CET")]`` (Python literals).

``tool_choice`` ``"required"`` or a named function is enforced with the structured-output
machinery (:mod:`jaxattn.serve.structured`): a Lark grammar whose calls are the
functions' JSON schemas, so the arguments always validate. ``"auto"`` lets the model
choose; its output is parsed after the fact, and text that is not a well-formed call is
content. ``"none"`` never parses calls.

:class:`ToolCallStream` turns the growing text of one output into OpenAI's stream deltas
(index, id, type and name first, then argument fragments); the concatenated fragments
equal the non-streamed ``arguments``, which are the exact JSON text the model wrote.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid

from jaxattn.serve.structured import StructuredOutput

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
# The head of a JSON-form call up to its arguments' first character.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')
_SEP = re.compile(r"\s*;?\s*")
_PYTHON_TAGS = ("<|python_start|>", "<|python_end|>")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def validate_tools(tools: list[dict]) -> dict[str, dict]:
    """name -> parameters schema of OpenAI ``tools``; ValueError for a malformed one."""
    out = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . -")
        if name in out:
            raise ValueError(f"tools: the function name {name!r} is given twice")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[name] = params
    return out


def resolve_choice(tool_choice, functions: dict[str, dict]) -> str | None:
    """``"none"``, ``"auto"``, ``"required"`` or ``None``, or the named function's name."""
    if tool_choice is None:
        return "auto" if functions else None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        if tool_choice != "none" and not functions:
            raise ValueError(f'tool_choice "{tool_choice}" needs tools')
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function":
        raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    if fn.get("name") not in functions:
        raise ValueError(f"tool_choice names {fn.get('name')!r}, which is not among the tools")
    return fn["name"]


def call_grammar(functions: dict[str, dict], choice: str, parallel: bool) -> StructuredOutput:
    """The grammar of ``choice`` ("required" or a function name): one call, or with
    ``parallel`` one or more separated by ``;``."""
    names = list(functions) if choice == "required" else [choice]
    schemas = [{"type": "object", "properties": {"name": {"const": n},
                                                 "parameters": functions[n]},
                "required": ["name", "parameters"], "additionalProperties": False}
               for n in names]
    call = json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    many = parallel and choice == "required"
    rule = 'call (";" call)*' if many else "call"
    return StructuredOutput(lark=f"start: {rule}\ncall: %json {call}\n")


def _value_end(text: str, start: int) -> int | None:
    """End of the JSON object or array at ``text[start]``, or None if it is not closed yet."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scan_json_calls(text: str) -> tuple[list[tuple[str, str, bool]], bool]:
    """The JSON-form calls of ``text`` so far: (name, arguments so far, complete) each, and
    whether all of ``text`` is calls (a prefix of calls while the last is incomplete)."""
    calls, pos = [], 0
    for tag in _PYTHON_TAGS:
        text = text.replace(tag, "")
    while True:
        m = _HEAD.match(text, pos)
        if m is None:
            return calls, not text[pos:].strip() and (not calls or calls[-1][2])
        name = json.loads(f'"{m.group(1)}"')
        start = m.end()
        if start < len(text) and text[start] not in "{[":
            return calls, False  # arguments must be an object
        end = _value_end(text, start) if start < len(text) else None
        if end is None:
            calls.append((name, text[start:], False))
            return calls, True
        close = re.compile(r"\s*\}").match(text, end)
        if close is None:
            calls.append((name, text[start:end], False))
            return calls, not text[end:].strip()
        calls.append((name, text[start:end], True))
        pos = _SEP.match(text, close.end()).end()
        if pos == len(text):
            return calls, True


def parse(text: str) -> list[ToolCall] | None:
    """The calls of a finished output, or None if it is not (only) tool calls."""
    body = text.strip()
    for tag in _PYTHON_TAGS:
        body = body.replace(tag, "")
    body = body.strip()
    if body.startswith("{"):
        calls, ok = scan_json_calls(body)
        if ok and calls and all(c[2] for c in calls) and all(_is_object(c[1]) for c in calls):
            return [ToolCall(n, a) for n, a, _ in calls]
        return _parse_json_objects(body)
    if body.startswith("["):
        return _parse_pythonic(body) or _parse_json_list(body)
    return None


def _is_object(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False


def _call_from(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _parse_json_objects(body: str) -> list[ToolCall] | None:
    """``{...}; {...}`` with the keys in any order (what an unconstrained model may write)."""
    dec, pos, calls = json.JSONDecoder(), 0, []
    while pos < len(body):
        try:
            obj, pos = dec.raw_decode(body, pos)
        except ValueError:
            return None
        call = _call_from(obj)
        if call is None:
            return None
        calls.append(call)
        pos = _SEP.match(body, pos).end()
    return calls or None


def _parse_json_list(body: str) -> list[ToolCall] | None:
    try:
        objs = json.loads(body)
    except ValueError:
        return None
    calls = [_call_from(o) for o in objs] if isinstance(objs, list) else [None]
    return calls if calls and all(calls) else None


def _parse_pythonic(body: str) -> list[ToolCall] | None:
    """``[f(a=1, b="x"), g()]``: calls of plain names with literal keyword arguments."""
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and not node.args
                and isinstance(node.func, (ast.Name, ast.Attribute))):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            calls.append(ToolCall(ast.unparse(node.func), json.dumps(args, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
    return calls


class ToolCallStream:
    """One output's text -> OpenAI chat stream deltas, for the three ways calls can come.

    ``constrained`` (required / named choice): the whole output is JSON-form calls, streamed
    as they are written: name once complete, then each new piece of the arguments.
    Otherwise (``auto``) text that starts like a call is held back until the output ends
    and then sent as calls if it parses, as content if not; other text streams at once.
    """

    def __init__(self, constrained: bool):
        self.constrained = constrained
        self.text = ""
        self.sent_args: list[int] = []  # per call: argument characters sent
        self.ids: list[str] = []
        self.held = False  # auto: the output looks like a call, content is held back
        self.decided = constrained  # auto: whether the first characters were seen
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool) -> list[dict]:
        """Deltas (``{"content": ...}`` or ``{"tool_calls": [...]}``) for new ``text``."""
        self.text += text
        if self.constrained:
            return self._stream_calls(final)
        if not self.decided:
            head = self.text.lstrip()
            if not head and not final:
                return []
            self.decided = True
            self.held = head[:1] in ("{", "[") or head.startswith(_PYTHON_TAGS[0])
            if not self.held:
                return [{"content": self.text}] if self.text else []
        elif not self.held:
            return [{"content": text}] if text else []
        if not final:
            return []
        calls = parse(self.text)
        if calls is None:
            return [{"content": self.text}] if self.text else []
        self.calls = calls
        out = []
        for i, c in enumerate(calls):
            out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
        return out

    def _stream_calls(self, final: bool) -> list[dict]:
        calls, _ = scan_json_calls(self.text)
        out = []
        for i, (name, args, complete) in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(ToolCall(name, "").id)
                self.sent_args.append(0)
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            if len(args) > self.sent_args[i]:
                out.append({"tool_calls": [{"index": i, "function": {
                    "arguments": args[self.sent_args[i]:]}}]})
                self.sent_args[i] = len(args)
        if final:
            self.calls = [ToolCall(n, a, self.ids[i]) for i, (n, a, _) in enumerate(calls)]
        return out
