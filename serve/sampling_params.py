"""How one request samples and when it stops (the fields vLLM users know).

Validation happens here, at construction, so a bad value is a ValueError
(HTTP 400 from the server) before anything reaches the engine.
"""

from __future__ import annotations

import dataclasses
import math

from jaxattn.serve.structured import StructuredOutput

# Top-token logprobs the sampler returns per row: a static size, so asking for
# logprobs never changes a compiled shape. 20 is OpenAI's limit for chat
# ``top_logprobs`` (and vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20
# Entries of ``logit_bias`` a request may carry: the sampler's bias table has a static width
# (this plus room for the stop ids that ``min_tokens`` suppresses), so the cap is a shape.
MAX_LOGIT_BIAS = 300
# Stop ids (EOS + stop_token_ids) that ``min_tokens`` can hold back (the rest of the table).
MAX_MIN_TOKENS_STOP_IDS = 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``max_tokens=None``: up to the model's length limit.

    ``stop`` strings end the text before them; ``stop_token_ids`` (and the
    model's EOS ids unless ``ignore_eos``) end it after that token, which is
    kept in ``token_ids`` but not in the text. ``seed`` makes a sampled
    output reproducible, independent of what else the engine runs.

    Logit processing, as OpenAI and vLLM define it, in this order: ``logit_bias``
    ({token id: bias in [-100, 100]}) is added; ``repetition_penalty`` (> 0; 1: off)
    divides a positive logit and multiplies a negative one of every token seen in the
    prompt or the output; ``frequency_penalty`` times a token's count in the output and
    ``presence_penalty`` once if it occurs there (both in [-2, 2]) are subtracted; a
    ``structured_output`` grammar forbids what cannot continue it. Then temperature,
    ``min_p`` (drop tokens less likely than ``min_p`` times the most likely one), top-k
    and top-p. ``min_tokens``: no EOS / stop token id and no stop string before that many
    output tokens (not applied to a grammar-constrained output, whose grammar decides
    where it ends).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    structured_output: StructuredOutput | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            _check(_finite(x) and -2 <= x <= 2, f"{name} must be in [-2, 2], got {x!r}")
        _check(_finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 1e4,
               f"repetition_penalty must be in (0, 1e4], got {self.repetition_penalty!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool)
               and self.min_tokens >= 0, f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.min_tokens:
            _check(len(self.stop_token_ids) <= MAX_MIN_TOKENS_STOP_IDS - 4,
                   f"min_tokens works with at most {MAX_MIN_TOKENS_STOP_IDS - 4} stop_token_ids")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias must map token ids to biases")
            _check(len(self.logit_bias) <= MAX_LOGIT_BIAS,
                   f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
            bias = {}
            for k, v in self.logit_bias.items():
                try:  # OpenAI's JSON keys are strings of token ids
                    t = int(k)
                except (TypeError, ValueError):
                    t = -1
                _check(t >= 0 and not isinstance(k, (bool, float)),
                       f"logit_bias keys must be token ids (ints >= 0), got {k!r}")
                _check(_finite(v) and -100 <= v <= 100,
                       f"logit_bias values must be in [-100, 100], got {v!r} for token {k!r}")
                bias[t] = float(v)
            object.__setattr__(self, "logit_bias", bias or None)
        _check(self.structured_output is None or isinstance(self.structured_output,
                                                            StructuredOutput),
               "structured_output must be a StructuredOutput")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether the sampler needs this sequence's token counts (prompt and output)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1)

    @property
    def processes_logits(self) -> bool:
        """Whether any logit processing applies beyond temperature / top-k / top-p."""
        return bool(self.penalized or self.min_p or self.min_tokens or self.logit_bias
                    or self.structured_output is not None)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)
