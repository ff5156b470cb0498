"""One generated sequence's state on the host (a request with ``n > 1`` has ``n`` of them)."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxattn.serve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV was dropped: recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed (drawn at admission when not given)
    stop_ids: frozenset[int]  # token ids that end the sequence (EOS unless ignored, stop_token_ids)
    max_tokens: int  # resolved: never past max_model_len
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + output
    num_computed: int = 0  # leading tokens whose KV is in the cache (or enqueued to be)
    num_inflight: int = 0  # tokens drawn on the device whose ids are not in ``tokens`` yet
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Position p holds the logprob of prompt token p (p >= 1) once a step has scored it; None
    # when the request wants no prompt logprobs (or for this sequence: only output 0 reports
    # them). Filled by position, so a prefill recomputed after preemption changes nothing.
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    matcher: object | None = None  # llguidance LLMatcher of a structured output (its tokens so far)
    penalty_slot: int | None = None  # its row of the device penalty table while it runs

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Prompt positions still to score: the prefix cache must not skip them."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens drawn but not yet in the cache (1 while decoding), in flight ones included."""
        return len(self.tokens) + self.num_inflight - self.num_computed

    @property
    def last_draw_in_flight(self) -> bool:
        """A token in flight is this sequence's last (max_tokens): nothing more to compute."""
        return self.num_inflight > 0 and self.num_output_tokens + self.num_inflight >= self.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
