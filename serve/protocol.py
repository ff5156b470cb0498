"""OpenAI request bodies (pydantic) and their translation to :class:`SamplingParams`.

Fields OpenAI defines that the engine cannot honour (suffix, best_of...) are
accepted at their neutral value and refused otherwise, so a client never silently
gets something other than what it asked for. ``response_format`` (both APIs) and
``tools`` / ``tool_choice`` (chat) become a constrained-decoding grammar
(:mod:`jaxattn.serve.structured`, :mod:`jaxattn.serve.tool_calls`).
Unknown fields are ignored, as OpenAI-compatible servers commonly do.

Every list and map stops at its first bad element (``fail_fast``): pydantic otherwise
reports each bad element of each member of a union, and a few MB of ``[1.5, 1.5, ...]`` as a
prompt became millions of error objects (seconds on the event loop, over a GB of memory).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxattn.serve import tool_calls
from jaxattn.serve.sampling_params import SamplingParams
from jaxattn.serve.structured import StructuredOutput

_FAIL_FAST = Field(fail_fast=True)
_Ints = Annotated[list[int], _FAIL_FAST]
_Strs = Annotated[list[str], _FAIL_FAST]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body (documented in the OpenAPI schema for every error status)."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # Strict: a value of the wrong JSON type is a 400 as the schema says, not coerced (`"logprobs":
    # false` would otherwise mean logprobs=0, `"n": "2"` n=2).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    seed: int | None = None
    stop: str | _Strs | None = None
    stop_token_ids: _Ints | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    min_tokens: int = 0  # extension (vLLM)
    logit_bias: Annotated[dict[str, float], _FAIL_FAST] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  structured: StructuredOutput | None = None) -> SamplingParams:
        from_format = structured_output_of(self.response_format)
        if from_format is not None and structured is not None:
            raise ValueError("response_format cannot be combined with a required or named "
                             "tool_choice")
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k, seed=self.seed,
            max_tokens=max_tokens, stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos, logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0, min_tokens=self.min_tokens,
            logit_bias=self.logit_bias or None, structured_output=from_format or structured)


def structured_output_of(response_format: dict | None) -> StructuredOutput | None:
    """OpenAI's ``response_format``: ``{"type": "text" | "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise ValueError('response_format json_schema needs {"json_schema": {"name": ..., '
                             '"schema": {...}}}')
        return StructuredOutput(json=spec.get("schema", {}))
    raise ValueError('response_format type must be "text", "json_object" or "json_schema"')


class CompletionRequest(_Common):
    prompt: str | _Strs | _Ints | Annotated[list[_Ints], _FAIL_FAST]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    return_token_ids: bool = False  # extension: each choice's token ids
    suffix: str | None = None
    best_of: int | None = None

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        return self._sampling(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[dict[str, Any]], _FAIL_FAST] | None = None
    tool_calls: Annotated[list[dict[str, Any]], _FAIL_FAST] | None = None
    tool_call_id: str | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        out = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            if self.role != "assistant":
                raise ValueError("only assistant messages carry tool_calls")
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _template_tool_call(call: dict) -> dict:
    """An OpenAI tool call as chat templates take it: arguments as a mapping, not JSON text."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('a tool call is {"id": ..., "type": "function", "function": '
                         '{"name": ..., "arguments": "{...}"}}')
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ValueError(f"tool call {fn['name']!r}: arguments are not JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {fn['name']!r}: arguments must be a JSON object")
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # extension
    tools: Annotated[list[dict], _FAIL_FAST] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def tool_setup(self) -> tuple[dict[str, dict], str | None]:
        """(function name -> parameters schema, the resolved tool_choice: None without tools,
        "none", "auto", "required" or a function name)."""
        functions = tool_calls.validate_tools(self.tools or [])
        return functions, tool_calls.resolve_choice(self.tool_choice, functions)

    def sampling_params(self) -> SamplingParams:
        functions, choice = self.tool_setup()
        grammar = (tool_calls.call_grammar(functions, choice, self.parallel_tool_calls)
                   if choice not in (None, "none", "auto") else None)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = (self.max_tokens if self.max_completion_tokens is None
                      else self.max_completion_tokens)  # 0 is an error, not "unset"
        return self._sampling(max_tokens, logprobs, grammar)


# /tokenize and /detokenize (vLLM's shapes) ------------------------------------------------------
class TokenizeRequest(BaseModel):
    """Either ``prompt`` (text; ``add_special_tokens`` default true) or chat ``messages``
    (rendered with the chat template; ``add_special_tokens`` default false: the template
    writes them)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], _FAIL_FAST] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: _Ints
