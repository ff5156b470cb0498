"""How one request samples and when it stops (the fields vLLM users know).

Validation happens here, at construction, so a bad value is a ValueError
(HTTP 400 from the server) before anything reaches the engine.
"""

from __future__ import annotations

import dataclasses
import math

# Top-token logprobs the sampler returns per row: a static size, so asking for
# logprobs never changes a compiled shape. 20 is OpenAI's limit for chat
# ``top_logprobs`` (and vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``max_tokens=None``: up to the model's length limit.

    ``stop`` strings end the text before them; ``stop_token_ids`` (and the
    model's EOS ids unless ``ignore_eos``) end it after that token, which is
    kept in ``token_ids`` but not in the text. ``seed`` makes a sampled
    output reproducible, independent of what else the engine runs.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token's and the top-k logprobs
    # None: off; k: each prompt token's logprob (the first has none) and the top-k there.
    # Such a request computes its whole prompt: it never starts from the prefix cache.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an int >= 0 (0 or -1: off), got {self.top_k!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               f"seed must be an int in [0, 2**63), got {self.seed!r}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check(all(isinstance(s, str) and s for s in stop),
               "stop must be a non-empty string or a list of them")
        _check(len(stop) <= 16 and sum(map(len, stop)) <= 4096,
               "stop: at most 16 strings of 4096 characters in all")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative ints")
        _check(self.logprobs is None or (isinstance(self.logprobs, int)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be an int in [0, {MAX_LOGPROBS}], got "
               f"{self.prompt_logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)
