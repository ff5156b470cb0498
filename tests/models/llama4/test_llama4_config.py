"""Reading Llama 4 configs the way transformers 5.17 does."""

import json
import os

import numpy as np
import pytest

from jaxattn.models.llama4 import Llama4Config

from llama4_fixtures import CONFIG_NAMES, checkpoint, expected

# Llama-4-Scout-17B-16E-Instruct's text_config (the keys that matter; legacy rope_scaling form,
# attn_temperature_tuning stored as an int).
SCOUT_TEXT = dict(
    attention_bias=False, attention_chunk_size=8192, attn_scale=0.1, attn_temperature_tuning=4,
    bos_token_id=200000, eos_token_id=[200001, 200007, 200008], floor_scale=8192, head_dim=128,
    hidden_act="silu", hidden_size=5120, interleave_moe_layer_step=1, intermediate_size=8192,
    intermediate_size_mlp=16384, max_position_embeddings=10485760, model_type="llama4_text",
    no_rope_layers=[], num_attention_heads=40, num_experts_per_tok=1, num_hidden_layers=48,
    num_key_value_heads=8, num_local_experts=16, pad_token_id=200018, rms_norm_eps=1e-05,
    rope_scaling=dict(factor=16.0, high_freq_factor=1.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192, rope_type="llama3"),
    rope_theta=500000.0, tie_word_embeddings=False, use_qk_norm=True, vocab_size=202048)


def test_scout_multimodal_config():
    c = Llama4Config.from_hf_dict({"model_type": "llama4", "text_config": SCOUT_TEXT,
                                   "vision_config": {"hidden_size": 1408}})
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.num_local_experts, c.num_experts_per_tok, c.attention_chunk_size) == \
        (5120, 48, 40, 8, 128, 16, 1, 8192)
    assert c.attn_temperature_tuning is True
    # Empty no_rope_layers -> HF's default: NoPE (global) every 4th layer.
    assert [i for i in range(48) if not c.use_rope(i)] == list(range(3, 48, 4))
    assert [i for i in range(48) if not c.is_chunked(i)] == list(range(3, 48, 4))
    assert c.moe_layers == tuple(range(48))
    assert c.eos_token_id == (200001, 200007, 200008)
    inv = c.inv_freq()  # low == high freq factor: HF's 0/0 band is empty
    assert inv.shape == (64,) and np.isfinite(inv).all()


def test_legacy_and_v5_rope_forms_agree():
    legacy = Llama4Config.from_hf_dict(SCOUT_TEXT)
    rp = dict(SCOUT_TEXT["rope_scaling"], rope_theta=SCOUT_TEXT["rope_theta"])
    v5 = {k: v for k, v in SCOUT_TEXT.items() if k not in ("rope_scaling", "rope_theta")}
    assert Llama4Config.from_hf_dict(dict(v5, rope_parameters=rp)) == legacy


def test_interleaved_moe_and_defaults():
    c = Llama4Config.from_hf_dict(dict(num_hidden_layers=6, interleave_moe_layer_step=2))
    assert c.moe_layers == (1, 3, 5)
    assert c.hidden_size == 5120 and c.rope_type == "default" and c.rope_theta == 500000.0


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_rope_frequencies_match_transformers(name):
    c = Llama4Config.from_pretrained(checkpoint(name))
    np.testing.assert_allclose(c.inv_freq(), expected(name)["inv_freq"], rtol=1e-6)


def test_to_hf_dict_round_trips():
    c = Llama4Config.from_pretrained(checkpoint("moe_dense"))
    with open(os.path.join(checkpoint("moe_dense"), "config.json")) as f:
        assert c.to_hf_dict() == json.load(f)
    rebuilt = Llama4Config.from_hf_dict(json.loads(json.dumps(
        {k: v for k, v in c.to_hf_dict().items()})))
    assert rebuilt == c


def test_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="rope_type"):
        Llama4Config.from_hf_dict(dict(rope_parameters=dict(rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="hidden_act"):
        Llama4Config.from_hf_dict(dict(hidden_act="gelu"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_dict_from_fields_round_trips(name):
    """A config built in code (no JSON behind it) still saves a dict that reads back the same."""
    import dataclasses

    c = dataclasses.replace(Llama4Config.from_pretrained(checkpoint(name)), hf_json="")
    d = json.loads(json.dumps(c.to_hf_dict()))
    assert Llama4Config.from_hf_dict(d) == c


def test_fixture_files_match_their_manifest():
    """The committed fixtures are exactly what make_fixtures.py wrote (it can `--check` that a
    rerun reproduces these hashes)."""
    import hashlib

    from llama4_fixtures import FIXTURES

    with open(os.path.join(FIXTURES, "MANIFEST.json")) as f:
        manifest = json.load(f)["sha256"]
    for rel, digest in manifest.items():
        with open(os.path.join(FIXTURES, rel), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, rel
