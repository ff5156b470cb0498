"""From sampled tokens to what a client sees: text, stop decisions and per-step deltas.

The engine hands every token a sequence draws to :meth:`OutputProcessor.on_token`,
which decides whether the sequence ends there (a stop token, a stop string, its
length limit) and returns the text to stream. Text that could still grow into a stop
string is held back until it cannot, so a stop string never leaks into an output.
"""

from __future__ import annotations

from jaxattn.serve.outputs import Delta, TokenLogprob
from jaxattn.serve.sequence import Sequence
from jaxattn.serve.tokenizer import IncrementalDetokenizer, Tokenizer


class _TextState:
    """One sequence's text side: incremental detokenizer, stop strings, what was streamed."""

    def __init__(self, tokenizer: Tokenizer | None, seq: Sequence):
        p = seq.params
        self.detok = (IncrementalDetokenizer(tokenizer, seq.prompt_token_ids,
                                             skip_special_tokens=p.skip_special_tokens)
                      if tokenizer is not None else None)
        self.stops = p.stop
        # Text that could be the start of a stop string is held back until it cannot be.
        self.hold = max(map(len, p.stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def add(self, token: int, *, final: bool, is_stop_id: bool,
            check_stops: bool = True) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string ended the text)."""
        if self.detok is None:
            return "", False
        # A stop token's own text is not part of the output.
        new = self.detok.add([] if is_stop_id else [token], final=final)
        start = max(0, len(self.text) - self.hold)
        self.text += new
        stopped = False
        if self.stops and new and check_stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, stopped = self.text[:min(hits)], True
        end = len(self.text) if (final or stopped) else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out, stopped


class OutputProcessor:
    """Detokenises and checks stops for every live sequence of one engine."""

    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self._text: dict[int, _TextState] = {}  # seq_id -> its text state

    def __len__(self) -> int:
        return len(self._text)

    def add(self, seq: Sequence) -> None:
        self._text[seq.seq_id] = _TextState(self.tokenizer, seq)

    def remove(self, seq: Sequence) -> None:
        self._text.pop(seq.seq_id, None)

    def on_token(self, seq: Sequence, token: int, *,
                 grammar_done: bool = False) -> tuple[str, str | None]:
        """``token`` was just appended to ``seq``: (text to emit, finish reason or None).
        ``grammar_done``: its structured output's grammar allows nothing after it."""
        reason = None
        if token in seq.stop_ids:
            reason = "stop"
        elif grammar_done:
            reason = "grammar"
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        # min_tokens: no stop string before that many tokens (vLLM's rule); stop ids are held
        # back on the device.
        text, stopped = self._text[seq.seq_id].add(
            token, final=reason is not None, is_stop_id=reason == "stop",
            check_stops=seq.num_output_tokens >= seq.params.min_tokens)
        return text, "stop" if stopped or reason == "grammar" else reason

    @staticmethod
    def delta(seq: Sequence, text: str, token_ids=(), logprobs: tuple[TokenLogprob, ...] | None = None,
              error: str | None = None) -> Delta:
        prompt_lps = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and token_ids:
            prompt_lps, seq.prompt_logprobs_sent = tuple(seq.prompt_logprobs), True
            seq.prompt_logprobs = []  # sent: nothing more to keep
        return Delta(seq.request_id, seq.index, text, tuple(token_ids), logprobs,
                     seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens,
                     seq.num_cached_tokens, error, prompt_lps)
