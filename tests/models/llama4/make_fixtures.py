"""Generate the transformers parity fixtures for the Llama 4 tests (torch on CPU).

    python make_fixtures.py            # (re)write fixtures/ and fixtures/MANIFEST.json
    python make_fixtures.py --check    # regenerate into a temp dir, compare hashes

Needs torch and transformers==5.17 (e.g. ``python3.11 -m venv /tmp/torchenv &&
/tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.17.0 safetensors numpy``);
the tests themselves only read the files written here, so CI needs no torch.

Per config (``CONFIGS``) it writes the HF checkpoint (``save_pretrained``) and
``expected.safetensors``: logits of a batch of sequences several attention chunks
long, and 32 greedy tokens after a prompt with the logits of the whole generated
sequence. Everything is seeded and computed in float32 with eager attention, so
a rerun writes byte-identical files (``--check`` proves it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                          Llama4TextConfig, Llama4VisionConfig)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
TRANSFORMERS_VERSION = "5.17.0"

# Tiny configs covering the structural options: chunk 32 (every test sequence crosses
# several chunk boundaries), NoPE + RoPE layers, floor_scale 16 so temperature tuning
# changes the queries within the test lengths, MoE and dense layers, >= 4 experts.
CONFIGS = {
    # llama3 RoPE scaling, QK norm, untied head, MoE on odd layers (dense on even),
    # NoPE on layers 2-3 (one dense, one MoE), top-1 routing.
    "moe_dense": dict(
        vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layers=[1, 1, 0, 0], attention_chunk_size=32, attn_temperature_tuning=True,
        floor_scale=16, attn_scale=0.3, use_qk_norm=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64),
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Default RoPE, no QK norm, tied embeddings, attention biases, every layer MoE with
    # top-2 of 6 experts, NoPE every 4th layer (HF's default no_rope_layer_interval).
    "tied_top2": dict(
        vocab_size=192, hidden_size=48, intermediate_size=32, intermediate_size_mlp=64,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        num_local_experts=6, num_experts_per_tok=2, interleave_moe_layer_step=1,
        attention_chunk_size=32, attn_temperature_tuning=True, floor_scale=16, attn_scale=0.2,
        use_qk_norm=False, tie_word_embeddings=True, attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
BATCH, SEQ_LEN = 2, 150  # > 4 chunks of 32, not a multiple of the chunk
PROMPT_LEN, NEW_TOKENS = 45, 32


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations (HF's 0.02 init gives near-tied logits, a weak test)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            new = torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            new = 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            new = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])  # [E, in, out]
        else:
            new = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])  # [out, in]
        with torch.no_grad():
            p.copy_(new)


def _greedy_no_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by recomputing the whole sequence each step: the definition."""
    seq = prompt
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


def build(name: str, kwargs: dict, out: str, seed: int) -> None:
    torch.manual_seed(seed)
    config = Llama4TextConfig(**kwargs)
    config._attn_implementation = "eager"
    model = Llama4ForCausalLM(config).eval()
    _reinit(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ_LEN), generator=g)
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT_LEN), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens = gen[:, PROMPT_LEN:]
        recomputed = _greedy_no_cache(model, prompt, NEW_TOKENS)
        if not torch.equal(tokens, recomputed):
            sys.exit(f"{name}: HF generate (with cache) and greedy recompute disagree")
        full = torch.cat([prompt, tokens], dim=1)
        gen_logits = model(full).logits[0]
        top2 = gen_logits[PROMPT_LEN - 1:-1].topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
    if margin < 1e-3:
        sys.exit(f"{name}: greedy margin {margin} too small for a robust parity test")
    path = os.path.join(out, name)
    model.save_pretrained(path)
    save_file({"input_ids": ids.numpy().astype(np.int32), "logits": logits.numpy(),
               "prompt": prompt[0].numpy().astype(np.int32),
               "greedy_tokens": tokens[0].numpy().astype(np.int32),
               "greedy_logits": gen_logits.numpy(),
               "inv_freq": model.model.rotary_emb.inv_freq.numpy()},
              os.path.join(path, "expected.safetensors"))
    print(f"{name}: logits |max| {logits.abs().max():.3f}, greedy top-2 margin {margin:.4f}")

    if name == "moe_dense":  # the same text weights inside a multimodal checkpoint
        vision = Llama4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, vision_output_dim=16, image_size=28,
                                    patch_size=14, projector_input_dim=16,
                                    projector_output_dim=16)
        mm_config = Llama4Config(vision_config=vision.to_dict(), text_config=config.to_dict())
        torch.manual_seed(seed)
        mm = Llama4ForConditionalGeneration(mm_config).eval()
        mm.language_model.load_state_dict(model.state_dict())
        mm.save_pretrained(os.path.join(out, name + "_multimodal"))


def _hashes(root: str) -> dict:
    out = {}
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f == "MANIFEST.json":
                continue
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def generate(out: str) -> dict:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one reduction order
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        build(name, kwargs, out, seed=1234 + i)
    return _hashes(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate in a temp dir and compare with MANIFEST.json")
    args = parser.parse_args()
    if transformers.__version__ != TRANSFORMERS_VERSION:
        print(f"warning: transformers {transformers.__version__}, fixtures were made with "
              f"{TRANSFORMERS_VERSION}", file=sys.stderr)
    if args.check:
        with open(os.path.join(OUT, "MANIFEST.json")) as f:
            want = json.load(f)["sha256"]
        with tempfile.TemporaryDirectory() as tmp:
            got = generate(tmp)
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        print("identical" if not bad else f"differ: {bad}")
        return 1 if bad else 0
    got = generate(OUT)
    with open(os.path.join(OUT, "MANIFEST.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "sha256": got}, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
