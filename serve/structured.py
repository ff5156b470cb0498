"""Constrained decoding: grammars for structured output and the token mask of each step.

A request's :class:`StructuredOutput` (``response_format`` json_object / json_schema, or
the grammar of a required / named tool call) becomes an llguidance grammar. Each
sequence that carries one has its own ``LLMatcher``: the engine feeds it every token the
sequence draws, and before each step that samples the sequence asks it for the set of
allowed next tokens as a packed bitmask row (bit ``t % 32`` of word ``t // 32``: token
``t`` allowed). The rows of a step form one ``[max_num_seqs, ceil(vocab / 32)]`` int32
array that the device sampler applies (rows without a grammar are all ones), so masks
never change a compiled shape.

Why llguidance: it compiles a JSON schema or Lark grammar lazily (no per-vocabulary
automaton to build first) and fills a mask row in tens of microseconds for a 200k-token
vocabulary; outlines-core had to build an index over the whole vocabulary per schema
(seconds) and xgrammar requires torch. ``benchmarks/grammar_masks.py`` measures them.

JSON is generated without optional whitespace (``whitespace_flexible: False``): still
valid JSON, and a weak or random-weight model cannot fill its budget with newlines
between tokens, a known failure mode of constrained decoding.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np

# Options of llguidance's JSON-schema compiler (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """One of: ``json`` (a JSON schema, as a dict or its JSON text), ``json_object`` (any
    JSON object), ``lark`` (a grammar in llguidance's Lark dialect; ``%json {...}``
    embeds a schema). Invalid ones are a ValueError here (HTTP 400 from the server)."""

    json: str | dict | None = None
    json_object: bool = False
    lark: str | None = None

    def __post_init__(self):
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))
        given = [self.json is not None, bool(self.json_object), self.lark is not None]
        if sum(given) != 1:
            raise ValueError("structured output needs exactly one of json, json_object, lark")
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
        err = _llguidance().LLMatcher.validate_grammar(self.grammar())
        if err:
            raise ValueError(f"invalid grammar: {err}")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this output."""
        m = _llguidance().LLMatcher
        if self.lark is not None:
            return m.grammar_from_lark(self.lark)
        schema = {"type": "object"} if self.json_object else json.loads(self.json)
        return m.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _llguidance():
    import llguidance

    return llguidance


class GrammarBackend:
    """The llguidance tokenizer of one model (built on first use: ~1 s for a large
    vocabulary) and the matchers made from it. Thread-safe construction."""

    def __init__(self, tokenizer, vocab_size: int):
        """``tokenizer``: a :class:`~jaxattn.serve.tokenizer.Tokenizer`; ``vocab_size``:
        the model's logits width (ids past the tokenizer's vocabulary are never allowed)."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                ll = _llguidance()
                self._lltok = ll.LLTokenizer(self.tokenizer.to_json(), n_vocab=self.vocab_size,
                                             eos_token=sorted(self.tokenizer.eos_token_ids) or None)
            return self._lltok

    def matcher(self, spec: StructuredOutput):
        """A fresh matcher at the start of ``spec``'s grammar; ValueError if it cannot be built
        for this tokenizer."""
        m = _llguidance().LLMatcher(self.lltokenizer, spec.grammar(), log_level=0)
        if m.is_error():
            raise ValueError(f"invalid grammar: {m.get_error()}")
        return m


def fill_row(matcher, mask: np.ndarray, row: int) -> None:
    """Write ``matcher``'s allowed next tokens into ``mask[row]`` (int32 words)."""
    v = mask[row]
    matcher.unsafe_compute_mask_ptr(v.ctypes.data, v.size * v.itemsize)


def consume(matcher, token: int) -> str | None:
    """Advance ``matcher`` over a drawn token; an error message if the grammar rejects it
    (the mask forbids that, so it is a bug or a token drawn without a mask)."""
    if not matcher.consume_token(token):
        return f"the grammar rejected token {token}: {matcher.get_error()}"
    return None
