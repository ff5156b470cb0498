"""Tokenizer files of a model directory, the chat template, and streaming detokenization."""

import numpy as np

from jaxattn.serve.tokenizer import IncrementalDetokenizer

TEXT = "Grüße aus 日本語 und 中文 — emoji 🚀✨🎉 and café, naïve."


def test_byte_level_round_trip_and_bos(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert ids[0] == 0  # <|begin_of_text|>
    assert tokenizer.decode(ids) == TEXT
    assert 4 in tokenizer.eos_token_ids  # <|eot|> (the model dir adds <|end_of_text|>)


def test_streaming_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # The small vocabulary splits multi-byte characters across tokens: the case that matters.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    prompt = tokenizer.encode("Once upon a time")
    for chunk in (1, 2, 3):
        d = IncrementalDetokenizer(tokenizer, prompt)
        parts = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
        parts.append(d.add([], final=True))
        assert all("\ufffd" not in p for p in parts), parts
        assert "".join(parts) == TEXT


def test_streaming_random_ids_equals_full_decode(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tokenizer.vocab_size, 30).tolist()
        d = IncrementalDetokenizer(tokenizer, [0])
        parts = [d.add([t]) for t in ids] + [d.add([], final=True)]
        assert "".join(parts) == tokenizer.decode(ids)


def test_chat_template_llama4_format(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(msgs)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nHi!<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")
    ids = tokenizer.encode_chat(msgs)
    assert ids.count(0) == 1 and ids[0] == 0  # the template's BOS only
