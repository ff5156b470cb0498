"""OpenAI request bodies (pydantic) and their translation to :class:`SamplingParams`.

Fields OpenAI defines that the engine cannot honour (penalties, logit_bias,
suffix, tools...) are accepted at their neutral value and refused otherwise,
so a client never silently gets something other than what it asked for.
Unknown fields are ignored, as OpenAI-compatible servers commonly do.

Every list and map stops at its first bad element (``fail_fast``): pydantic otherwise
reports each bad element of each member of a union, and a few MB of ``[1.5, 1.5, ...]`` as a
prompt became millions of error objects (seconds on the event loop, over a GB of memory).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxattn.serve.sampling_params import SamplingParams

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
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: Annotated[dict[str, float], _FAIL_FAST] | None = None
    user: str | None = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k, seed=self.seed,
            max_tokens=max_tokens, stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos, logprobs=logprobs)


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

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # extension
    tools: Annotated[list[dict], _FAIL_FAST] | None = None

    def sampling_params(self) -> SamplingParams:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = (self.max_tokens if self.max_completion_tokens is None
                      else self.max_completion_tokens)  # 0 is an error, not "unset"
        return self._sampling(max_tokens, logprobs)


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
