"""Llama 4 text configuration, read from a Hugging Face ``config.json``.

Every value comes from the file; a key the file lacks takes the default that
transformers' ``Llama4TextConfig`` gives it (5.17), and derived lists
(``no_rope_layers``, ``moe_layers``, ``layer_types``) are filled the way
``Llama4TextConfig.__post_init__`` fills them, so a config means the same
thing here as in transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

# Llama4TextConfig's defaults (transformers 5.17), used only for keys a file omits.
_HF_DEFAULTS = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    hidden_act="silu", max_position_embeddings=4096 * 32, initializer_range=0.02,
    rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, num_experts_per_tok=1, num_local_experts=16, moe_layers=None,
    interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layers=None, no_rope_layer_interval=4,
    attention_chunk_size=8192, layer_types=None, attn_temperature_tuning=True, floor_scale=8192,
    attn_scale=0.1, attention_bias=False,
)
_DEFAULT_THETA = 500000.0
ROPE_TYPES = ("default", "llama3")
LAYER_TYPES = ("chunked_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    """Static description of a Llama 4 text decoder (hashable: usable as a jit static arg)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared experts
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    num_experts_per_tok: int
    num_local_experts: int
    moe_layers: tuple[int, ...]
    use_qk_norm: bool
    no_rope_layers: tuple[int, ...]  # 1: the layer uses RoPE; 0: NoPE
    layer_types: tuple[str, ...]  # "chunked_attention" | "full_attention" per layer
    attention_chunk_size: int | None
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    attention_bias: bool
    rope_type: str = "default"
    rope_theta: float = _DEFAULT_THETA
    rope_factor: float = 1.0  # llama3 scaling
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096 * 32
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The text config exactly as read (JSON), so `save` writes back what was loaded.
    hf_json: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} unsupported (Llama 4 uses 'silu')")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} unsupported; expected one of {ROPE_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if len(self.no_rope_layers) < n:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries < "
                             f"num_hidden_layers={n}")
        if len(self.layer_types) < n or not set(self.layer_types[:n]) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must give one of {LAYER_TYPES} per layer; got "
                             f"{self.layer_types}")
        if any(t == "chunked_attention" for t in self.layer_types[:n]) and \
                not self.attention_chunk_size:
            raise ValueError("chunked_attention layers need attention_chunk_size")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_local_experts={self.num_local_experts}]")

    # Per-layer structure -------------------------------------------------------------
    def use_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_chunked(self, layer: int) -> bool:
        return self.layer_types[layer] == "chunked_attention"

    def layer_chunk_size(self, layer: int) -> int | None:
        return self.attention_chunk_size if self.is_chunked(layer) else None

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] (float32), computed in HF's order of operations."""
        d = self.head_dim
        inv = (1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32)
                                                       / np.float32(d)))).astype(np.float32)
        if self.rope_type == "default":
            return inv
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
        factor, lo, hi = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
        old = self.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = np.float32(2 * math.pi) / inv
        llama = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        # Scout has low == high factor: HF divides by zero too, and the band it would
        # smooth is then empty, so the inf/nan never reaches the result.
        with np.errstate(divide="ignore", invalid="ignore"):
            smooth = ((old / wavelen - lo) / np.float32(hi - lo)).astype(np.float32)
            smoothed = ((1 - smooth) * llama / np.float32(factor) + smooth * llama).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, llama).astype(np.float32)

    # Construction ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "Llama4Config":
        """From a ``Llama4TextConfig`` dict, or a multimodal ``Llama4Config`` dict (its ``text_config``)."""
        if "text_config" in d and d.get("model_type") != "llama4_text":
            text = dict(d["text_config"] or {})
        else:
            text = dict(d)
        raw = json.dumps(text, sort_keys=True)
        t = {**_HF_DEFAULTS, **{k: v for k, v in text.items() if k in _HF_DEFAULTS}}
        n = t["num_hidden_layers"]
        head_dim = t["head_dim"] if t["head_dim"] is not None else \
            t["hidden_size"] // t["num_attention_heads"]
        no_rope = t["no_rope_layers"] or [int((i + 1) % t["no_rope_layer_interval"] != 0)
                                          for i in range(n)]
        moe = t["moe_layers"] if t["moe_layers"] is not None else \
            list(range(t["interleave_moe_layer_step"] - 1, n, t["interleave_moe_layer_step"]))
        layer_types = t["layer_types"] or ["chunked_attention" if r else "full_attention"
                                           for r in no_rope]
        rope = _rope_params(text, t["max_position_embeddings"])
        eos = t["eos_token_id"]
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            intermediate_size_mlp=t["intermediate_size_mlp"], num_hidden_layers=n,
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"] or t["num_attention_heads"],
            head_dim=head_dim, rms_norm_eps=float(t["rms_norm_eps"]),
            tie_word_embeddings=bool(t["tie_word_embeddings"]),
            num_experts_per_tok=t["num_experts_per_tok"], num_local_experts=t["num_local_experts"],
            moe_layers=tuple(moe), use_qk_norm=bool(t["use_qk_norm"]),
            no_rope_layers=tuple(int(x) for x in no_rope), layer_types=tuple(layer_types),
            attention_chunk_size=t["attention_chunk_size"],
            # Scout's file stores attn_temperature_tuning as an int (4): HF only tests truth.
            attn_temperature_tuning=bool(t["attn_temperature_tuning"]),
            floor_scale=t["floor_scale"], attn_scale=float(t["attn_scale"]),
            attention_bias=bool(t["attention_bias"]),
            max_position_embeddings=t["max_position_embeddings"], hidden_act=t["hidden_act"],
            initializer_range=float(t["initializer_range"]), bos_token_id=t["bos_token_id"],
            eos_token_id=eos, pad_token_id=t["pad_token_id"], hf_json=raw, **rope)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Llama4Config":
        """From a checkpoint directory (its ``config.json``) or a path to a JSON file."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """The ``Llama4TextConfig`` dict: the one read if any, else built from the fields."""
        if self.hf_json:
            return json.loads(self.hf_json)
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name in _HF_DEFAULTS}
        d.update(model_type="llama4_text", architectures=["Llama4ForCausalLM"],
                 rope_parameters=rope, moe_layers=list(self.moe_layers),
                 no_rope_layers=list(self.no_rope_layers), layer_types=list(self.layer_types),
                 eos_token_id=list(self.eos_token_id))
        return d


def _rope_params(text: dict, max_pos: int) -> dict:
    """RoPE settings from either ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``."""
    rp = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = rp.get("rope_theta", text.get("rope_theta")) or _DEFAULT_THETA
    out = dict(rope_type=rope_type, rope_theta=float(theta))
    if rope_type == "llama3":
        out.update(rope_factor=float(rp["factor"]), rope_low_freq_factor=float(rp["low_freq_factor"]),
                   rope_high_freq_factor=float(rp["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(
                       rp.get("original_max_position_embeddings", max_pos)))
    return out
