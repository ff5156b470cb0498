"""Text <-> token ids from a Hugging Face model directory, chat templates, streaming decode.

* ``tokenizer.json`` through the ``tokenizers`` library (fast, no torch).
* The chat template from ``chat_template.jinja`` or ``tokenizer_config.json``,
  rendered with jinja2 in a sandbox, the way transformers renders it
  (trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``).
* :class:`IncrementalDetokenizer`: text deltas for a growing list of ids
  that never end inside a UTF-8 character.
* :meth:`Tokenizer.min_num_tokens`: a lower bound on a text's token count
  from its length alone, so the server refuses a prompt that cannot fit
  without spending seconds tokenising it.

The tokenizers library lets go of the GIL while it encodes, so several
threads can tokenise at once (the server does, off its event loop).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Sequence

# A streamed delta is cut where the decoded text no longer ends in U+FFFD (an
# incomplete UTF-8 sequence). Some context before the new ids keeps decoders
# that drop a leading space (SentencePiece's Metaspace) honest.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast Hugging Face "
                                    "tokenizer is needed)")
        self._tok = HFTokenizer.from_file(path)
        cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        self.chat_template = _chat_template(model_dir, cfg)
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        model_cfg = _read_json(os.path.join(model_dir, "config.json"))
        model_cfg = model_cfg.get("text_config", model_cfg)
        eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        if eos is None and self.eos_token is not None:
            eos = self._tok.token_to_id(self.eos_token)
        self.eos_token_ids = frozenset(
            [] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        self._template = None
        # At most this many UTF-8 bytes (so characters) of input make one token; None when the
        # pipeline cannot vouch for it.
        spec = _read_json(path)
        self.max_bytes_per_token = _max_bytes_per_token(spec, self._tok.truncation)
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
        self._added = {t["id"]: t["content"] for t in spec.get("added_tokens") or ()}

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text))`` that costs nothing (0 if unknown)."""
        if self.max_bytes_per_token is None:
            return 0
        return -(-len(text) // self.max_bytes_per_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """ValueError for text that is not valid Unicode (a lone surrogate, which JSON's
        ``\\ud800`` escapes can carry): the tokenizers library would raise a TypeError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode ({e.reason} at character "
                             f"{e.start})") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when they end inside a UTF-8 character (where
        ``decode`` gives U+FFFD): byte-level BPE pieces map back through the byte alphabet,
        SentencePiece byte-fallback pieces (``<0xE2>``) are that byte, added tokens their text."""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.id_to_token(token_id)
        if self._byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     **kwargs)

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        # The template writes the BOS token itself: encoding must not add another.
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns one sequence's output ids into text deltas (the prompt's tail is context only)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], *,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] decode to text already emitted (the context)
        self._read = len(self._ids)
        self.text = ""

    def add(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Append ids; return the new complete text (all of it when ``final``)."""
        self._ids.extend(token_ids)
        if self._read == len(self._ids):
            return ""
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        full = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if not final and (len(full) <= len(done) or full.endswith(_REPLACEMENT)):
            return ""  # wait: a character is still incomplete (or nothing visible yet)
        delta = full[len(done):]
        # The ids just read become the context of the next decode.
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


# Pre-tokenizers that split the text without dropping any of it.
_KEEPS_EVERY_BYTE = {"ByteLevel", "Split", "Digits", "Punctuation"}


def _max_bytes_per_token(spec: dict, truncation) -> int | None:
    """The most input bytes one token can stand for, when every byte of the input is sure to
    end up in exactly one token: byte-level BPE (Llama 3 and 4's kind) with every byte in its
    vocabulary, no normalizer and no truncation. Added tokens are matched in the raw text, so
    their lengths count too. Anything else (a normalizer that may shrink the text, a
    pre-tokenizer that drops whitespace, unknown characters fused into one ``<unk>``, an added
    token that swallows the whitespace around it) gets None: no bound, the text is tokenised
    in full."""
    from tokenizers.pre_tokenizers import ByteLevel

    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None or truncation:
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [step.get("type") for step in steps]
    if ("ByteLevel" not in types or not set(types) <= _KEEPS_EVERY_BYTE
            or any(step.get("behavior") == "Removed" for step in steps)):
        return None
    vocab = model.get("vocab") or {}
    if not all(c in vocab for c in ByteLevel.alphabet()):
        return None  # a byte missing from the vocabulary would be dropped or become <unk>
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    # A byte-level piece has one character per byte.
    longest = max(map(len, vocab), default=1)
    return max([longest, *(len(t.get("content", "").encode("utf-8")) for t in added)])


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each of the 256 bytes is one printable character."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    # The alphabet is a set: rebuild GPT-2's order (printable bytes map to themselves, the rest
    # to 256 + n in byte order).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    assert set(table) == set(chars), "unexpected byte-level alphabet"
    return table


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _chat_template(model_dir: str, cfg: dict) -> str | None:
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
