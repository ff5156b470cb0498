"""Paths and readers for the transformers parity fixtures (see make_fixtures.py)."""

import os

import numpy as np
from safetensors.numpy import load_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CONFIG_NAMES = ("moe_dense", "tied_top2")


def checkpoint(name: str) -> str:
    return os.path.join(FIXTURES, name)


def expected(name: str) -> dict[str, np.ndarray]:
    """input_ids [B, L], logits [B, L, V], prompt [P], greedy_tokens [32],
    greedy_logits [P + 32, V] (teacher-forced over prompt + tokens), inv_freq [D/2]."""
    return load_file(os.path.join(FIXTURES, name, "expected.safetensors"))


def max_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


# Modules llm-compressor's FP8_DYNAMIC recipe for Llama 4 leaves unquantised (regexes, as in
# its ``ignore``): the LM head, the router, the vision tower and projector, and (unless
# asked) attention.
CT_IGNORE = ["re:.*lm_head", "re:.*router", "re:.*vision_model.*", "re:.*multi_modal_projector.*"]


def write_compressed_tensors(src: str, dst: str, *, quantize_attention: bool = False,
                             multimodal: bool = True) -> None:
    """Write the HF checkpoint ``src`` (f32/bf16) as a compressed-tensors FP8 checkpoint in
    ``dst``, the way llm-compressor saves Llama 4 with the ``FP8_DYNAMIC`` scheme:

    * the MoE's fused ``experts.gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` unfused
      into per-expert linears ``experts.{e}.{gate,up,down}_proj.weight`` (``[out, in]``);
    * every quantised linear as ``weight`` float8_e4m3fn and ``weight_scale [out, 1]`` in the
      original dtype (bf16 here); scale = absmax / 448 per output channel, rounded to bf16
      first, the weight divided by the rounded scale;
    * everything else (embeddings, norms, router, LM head; attention unless
      ``quantize_attention``) in bf16, and ``quantization_config`` in config.json;
    * ``multimodal``: under ``language_model.`` with Llama4ForConditionalGeneration's config.
    """
    import json
    import shutil

    import ml_dtypes
    from safetensors.numpy import save_file

    bf16, f8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    prefix = "language_model." if multimodal else ""
    ignore = CT_IGNORE + ([] if quantize_attention else ["re:.*self_attn.*"])

    def quant(w):  # [out, in] f32 -> fp8, [out, 1] bf16
        scale = (np.abs(w).max(1, keepdims=True) / 448.0).astype(bf16)
        s = np.maximum(scale.astype(np.float32), 1e-12)
        return np.clip(w / s, -448, 448).astype(f8), scale

    out = {}

    def linear(name, w):
        module = prefix + name[:-len(".weight")]
        if ("self_attn" in name and not quantize_attention) or "router" in name:
            out[prefix + name] = w.astype(bf16)
            return
        q, s = quant(w.astype(np.float32))
        # C order: the expert slices are transposed views, and safetensors writes the buffer.
        out[module + ".weight"], out[module + ".weight_scale"] = (np.ascontiguousarray(q),
                                                                  np.ascontiguousarray(s))

    for name, w in tensors.items():
        name = name[len("language_model."):] if name.startswith("language_model.") else name
        if name.startswith(("vision_model.", "multi_modal_projector.")):
            continue
        if name.endswith("experts.gate_up_proj"):
            base, inter = name[:-len(".gate_up_proj")], w.shape[2] // 2
            for e in range(w.shape[0]):
                linear(f"{base}.{e}.gate_proj.weight", w[e, :, :inter].T)
                linear(f"{base}.{e}.up_proj.weight", w[e, :, inter:].T)
        elif name.endswith("experts.down_proj"):
            base = name[:-len(".down_proj")]
            for e in range(w.shape[0]):
                linear(f"{base}.{e}.down_proj.weight", w[e].T)
        elif name.endswith(".weight") and w.ndim == 2 and "embed_tokens" not in name \
                and "lm_head" not in name:
            linear(name, w)
        else:
            out[prefix + name] = w.astype(bf16)
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    qc = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "kv_cache_scheme": None,
        "global_compression_ratio": None, "ignore": ignore,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None,
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                        "dynamic": False, "group_size": None, "block_structure": None,
                        "actorder": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                  "strategy": "token", "dynamic": True, "group_size": None,
                                  "block_structure": None, "actorder": None, "observer": None,
                                  "observer_kwargs": {}}}},
    }
    text = dict(text, torch_dtype="bfloat16")
    if multimodal:
        config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                  "text_config": text, "quantization_config": qc}
    else:
        config = dict(text, quantization_config=qc)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), dst)
