"""The MoE block: routing as HF computes it, and bucket padding rows reaching no expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.models import llama4
from jaxattn.models.llama4.moe import Experts, MoE, counting_sort


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(0, 16), min_size=1, max_size=300))
def test_counting_sort_is_a_stable_argsort(extra, keys):
    """The expert order of the MoE (padding rows carry the past-the-end id): a stable
    argsort, its inverse and the counts."""
    num_keys = max(keys) + extra
    keys = np.asarray(keys, np.int32)
    want = np.argsort(keys, kind="stable")
    order, position, counts = counting_sort(jnp.asarray(keys), num_keys)
    np.testing.assert_array_equal(order, want)
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(position)], np.arange(len(keys)))
    np.testing.assert_array_equal(counts, np.bincount(keys, minlength=num_keys))


@pytest.mark.slow
def test_padding_rows_go_to_no_expert(monkeypatch):
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1))
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)
    valid = jnp.arange(16) < 5
    seen = []
    call = Experts.__call__

    def spy(self, rows, group_sizes, impl="auto"):
        seen.append(np.asarray(group_sizes))
        return call(self, rows, group_sizes, impl)

    monkeypatch.setattr(Experts, "__call__", spy)
    padded = moe(x, valid=valid)
    alone = moe(x[:5])
    # Only the 5 tokens were routed to the 4 experts; the 11 padding rows to none.
    assert seen[0][:4].sum() == 5 and list(seen[0][4:]) == [11] and seen[1].sum() == 5
    np.testing.assert_allclose(padded[:5], alone, rtol=1e-5, atol=1e-6)
    # Padding rows: the shared expert only (their routed part is zero, not garbage).
    np.testing.assert_allclose(padded[5:], moe.shared_expert(x[5:]), rtol=1e-5, atol=1e-6)
    assert bool(jnp.isfinite(padded).all())


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_matches_a_per_token_loop(top_k):
    """Each token's output: the shared expert plus, for each of its top-k experts, that
    expert's SwiGLU of the token scaled by the sigmoid of its router logit (HF's
    Llama4TextMoe), computed token by token."""
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=512, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=5, num_experts_per_tok=top_k, interleave_moe_layer_step=1))
    moe = MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (23, 32), jnp.float32)
    got = moe(x, gmm_impl="xla")
    logits = np.asarray(moe.router(x))
    e = moe.experts
    want = np.array(moe.shared_expert(x))
    for t in range(x.shape[0]):
        for j in np.argsort(-logits[t], kind="stable")[:top_k]:
            xt = x[t] * jax.nn.sigmoid(logits[t, j])
            h = jax.nn.silu(xt @ e.gate_proj[j]) * (xt @ e.up_proj[j])
            want[t] += np.asarray(h @ e.down_proj[j])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
