"""What the engine hands back: per-step deltas (streaming) and whole results (vLLM-shaped)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one sequence gained in one engine step."""

    request_id: str
    index: int  # which of the request's n outputs
    text: str  # new text (complete characters; stop strings never leak out)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    # With SamplingParams.prompt_logprobs, on output 0's first delta: one entry per prompt
    # token, None for the first (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @staticmethod
    def join(parts: "list[Delta]") -> "Delta":
        """One sequence's consecutive deltas as one (a burst of decode steps landing at once)."""
        last = parts[-1]
        lps = [d.logprobs for d in parts]
        return dataclasses.replace(
            last, text="".join(d.text for d in parts),
            token_ids=tuple(t for d in parts for t in d.token_ids),
            logprobs=None if all(x is None for x in lps) else tuple(
                lp for x in lps for lp in x or ()),
            prompt_logprobs=next((d.prompt_logprobs for d in parts
                                  if d.prompt_logprobs is not None), None))


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, d: Delta) -> None:
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = list(d.prompt_logprobs)
        out = self.outputs[d.index]
        out.text += d.text
        out.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + list(d.logprobs)
        if d.finish_reason is not None:
            out.finish_reason = d.finish_reason
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        self.finished = all(o.finish_reason is not None for o in self.outputs)
