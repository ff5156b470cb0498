"""Checkpoint loading and saving: round trips, sharding, errors, host memory."""

import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxattn.models import llama4

from llama4_fixtures import checkpoint, expected


def _tensors(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(path, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for file in files:
        out.update(load_file(os.path.join(path, file)))
    return out


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("name", ["moe_dense", "tied_top2"])
def test_round_trip_is_exact(name, tmp_path):
    src = checkpoint(name)
    llama4.save(llama4.load(src), tmp_path)
    _assert_same_tensors(_tensors(src), _tensors(tmp_path))
    with open(os.path.join(src, "config.json")) as f, open(tmp_path / "config.json") as g:
        assert json.load(f) == json.load(g)


def test_multimodal_saves_as_text_checkpoint(tmp_path):
    llama4.save(llama4.load(checkpoint("moe_dense_multimodal")), tmp_path)
    _assert_same_tensors(_tensors(checkpoint("moe_dense")), _tensors(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == "llama4_text"
    assert llama4.Llama4Config.from_pretrained(tmp_path) == \
        llama4.Llama4Config.from_pretrained(checkpoint("moe_dense"))


def test_fused_experts_split_as_hf_chunks():
    """gate_up_proj [E, H, 2I]: first half of the last axis is the gate, second the up."""
    model = llama4.load(checkpoint("moe_dense"))
    fused = _tensors(checkpoint("moe_dense"))["model.layers.1.feed_forward.experts.gate_up_proj"]
    experts = model.model.layers[1].feed_forward.experts
    inter = model.config.intermediate_size
    np.testing.assert_array_equal(np.asarray(experts.gate_proj[...]), fused[..., :inter])
    np.testing.assert_array_equal(np.asarray(experts.up_proj[...]), fused[..., inter:])


def test_sharded_checkpoint_and_dtype(tmp_path):
    model = llama4.load(checkpoint("moe_dense"))
    llama4.save(model, tmp_path, max_shard_bytes=200_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    _assert_same_tensors(_tensors(checkpoint("moe_dense")), _tensors(tmp_path))
    half = llama4.load(tmp_path, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(half)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


@pytest.fixture
def broken(tmp_path):
    """A copy of the moe_dense checkpoint whose tensors a test edits."""
    src = checkpoint("moe_dense")
    tensors = _tensors(src)
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())

    def write(edit):
        t = dict(tensors)
        edit(t)
        save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        return tmp_path

    return write


def test_missing_tensor_is_named(broken):
    path = broken(lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.2\.self_attn\.k_proj"):
        llama4.load(path)


def test_unexpected_tensor_is_named(broken):
    path = broken(lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.9\.extra\.weight"):
        llama4.load(path)


def test_misshaped_tensor_is_named(broken):
    name = "model.layers.1.feed_forward.experts.down_proj"
    path = broken(lambda t: t.update({name: t[name][:, :-1]}))
    with pytest.raises(ValueError, match=rf"{name} .* has shape \(4, 63, 64\), expected \(4, 64, 64\)"):
        llama4.load(path)


def test_load_holds_about_one_tensor_on_the_host(tmp_path):
    """Host (Python-heap) peak while loading ~ the largest tensors, not the model.

    On the CPU backend "device" buffers are host memory too and a buffer that aliased a
    file tensor is released lazily (at a later dispatch), so up to two tensors can be
    alive at once here; on a GPU the block after each transfer frees it at once.
    """
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=4096, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=8, interleave_moe_layer_step=2, attention_chunk_size=64))
    llama4.save(llama4.init_random(config, seed=3), tmp_path)
    sizes = sorted(int(np.prod(t.shape)) * 4 for t in llama4.tensor_map(config))
    total, two_largest = sum(sizes), sizes[-1] + sizes[-2]
    assert total > 5 * two_largest
    llama4.load(tmp_path, dtype=jnp.bfloat16)  # compile the converters outside the measurement
    tracemalloc.start()
    try:
        llama4.load(tmp_path, dtype=jnp.bfloat16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"host peak {peak / 2**20:.2f} MiB; largest tensor {sizes[-1] / 2**20:.2f} MiB; "
          f"model {total / 2**20:.2f} MiB")
    assert peak < two_largest + 2**20  # + ~1 MiB of Python objects (modules, headers)


def test_init_random_is_seeded():
    config = llama4.Llama4Config.from_pretrained(checkpoint("moe_dense"))
    a, b, c = (llama4.init_random(config, seed=s) for s in (0, 0, 1))
    la, lb, lc = (jax.tree.leaves(m) for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not all(np.array_equal(x, y) for x, y in zip(la, lc))


def test_load_onto_a_one_device_mesh_runs_the_sharded_forward():
    """A mesh of one device takes the shard_map path (collectives over size-1 axes): same
    logits as transformers. The 8-device layouts are tested in tests/sharded (own process)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxattn import parallel

    mesh = parallel.make_mesh(parallel.ParallelConfig())
    model = llama4.load(checkpoint("moe_dense"), mesh=mesh)
    assert model.mesh is mesh
    q = model.model.layers[0].self_attn.q_proj.weight[...]
    assert q.sharding == NamedSharding(mesh, P())  # size-1 axes split nothing
    e = expected("moe_dense")
    assert np.abs(np.asarray(model(e["input_ids"])) - e["logits"]).max() < 1e-4
