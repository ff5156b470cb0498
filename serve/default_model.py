"""The embedded default model: a tiny Llama 4 with seeded RANDOM weights, built offline.

``python -m jaxattn.serve`` with no ``--model`` (and ``jaxattn.LLM()``) use it,
so the server works on a fresh machine with no download. It is written once
to a cache directory as an ordinary Hugging Face model directory (config,
safetensors, tokenizer files, chat template) and then loaded through the same
path as any real checkpoint. Its text is gibberish: the weights are random.

The tokenizer is a byte-level BPE trained here on ``data/corpus.txt`` (a few
KB shipped with the package), with Llama 4's special tokens and chat format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

RANDOM_WEIGHTS_NOTICE = ("jaxattn: no --model given: using the embedded tiny Llama 4 with RANDOM "
                         "weights (seeded) — its output is gibberish. Pass --model DIR for a real "
                         "checkpoint.")

_VERSION = 1
_SEED = 0
_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>",
                  "<|eot|>", "<|finetune_right_pad_id|>"]
# Llama 4's chat format (text only), with tools the way Llama 4's own template writes them:
# their JSON schemas in the system turn, an assistant's calls as JSON
# {"name": ..., "parameters": {...}} (several separated by ";"), and tool results in
# "ipython" turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|header_start|>system<|header_end|>\n\nEnvironment: ipython\n' }}"
    "{{ 'To call a function, respond with JSON in the format {\"name\": function name, "
    "\"parameters\": dictionary of argument name and its value}; separate several calls "
    "with \";\". Do not use variables.\n\n' }}"
    "{% for t in tools %}{{ t | tojson(indent=4) }}{{ '\n\n' }}{% endfor %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{{ '<|eot|>' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' or message['role'] == 'ipython' %}"
    "{{ '<|header_start|>ipython<|header_end|>\n\n' }}"
    "{% else %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% endif %}"
    "{{ message['content'] | trim }}"
    "{% if message.tool_calls is defined and message.tool_calls %}"
    "{% for call in message.tool_calls %}{% if not loop.first %};{% endif %}"
    "{{ '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}")


def _text_config(vocab_size: int) -> dict:
    """Scout's structure at toy size: 3 chunked-local RoPE layers then a global NoPE layer,
    MoE on every other layer, head_dim 64 (a size the kernels take)."""
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 128,
        "intermediate_size_mlp": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.05, "rms_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 5,
        "tie_word_embeddings": False, "num_experts_per_tok": 1, "num_local_experts": 4,
        "interleave_moe_layer_step": 2, "moe_layers": [1, 3], "use_qk_norm": True,
        "no_rope_layers": [1, 1, 1, 0],
        "layer_types": ["chunked_attention"] * 3 + ["full_attention"],
        "attention_chunk_size": 256, "attn_temperature_tuning": True, "floor_scale": 8192,
        "attn_scale": 0.1, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "dtype": "float32",
    }


def _corpus() -> str:
    with open(os.path.join(os.path.dirname(__file__), "data", "corpus.txt"), encoding="utf-8") as f:
        return f.read()


def _fingerprint() -> str:
    h = hashlib.sha256(json.dumps([_VERSION, _SEED, _VOCAB_SIZE, SPECIAL_TOKENS, CHAT_TEMPLATE,
                                   _text_config(0), _corpus()]).encode())
    return h.hexdigest()[:12]


def cache_root() -> str:
    return os.environ.get("JAXATTN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxattn")


def build_tokenizer(path: str) -> int:
    """Train the byte-level BPE and write tokenizer.json + tokenizer_config.json; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus().splitlines(keepends=True), trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                   "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad_id|>",
                   "add_bos_token": True, "model_max_length": 4096,
                   "chat_template": CHAT_TEMPLATE}, f, indent=2)
    return tok.get_vocab_size(with_added_tokens=True)


def build(path: str) -> None:
    """Write the whole model directory to ``path``."""
    import jax.numpy as jnp

    from jaxattn.models import llama4

    vocab = build_tokenizer(path)
    config = llama4.Llama4Config.from_hf_dict(_text_config(vocab))
    llama4.save(llama4.init_random(config, seed=_SEED, dtype=jnp.float32), path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 5}, f, indent=2)


def default_model_dir(builder=build) -> str:
    """The cached directory, built on first use (atomically: concurrent first uses are safe)."""
    root = cache_root()
    final = os.path.join(root, f"tiny-llama4-random-{_fingerprint()}")
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    try:
        builder(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not os.path.exists(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
