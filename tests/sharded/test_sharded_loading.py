"""Sharded loading: each device receives only its shard, read from the file as a slice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.models import llama4
from jaxattn.models.llama4 import loader

from sharded_cases import config, max_err, mesh


class _SliceSpy:
    def __init__(self, log, name, sl):
        self.log, self.name, self.sl = log, name, sl

    def get_shape(self):
        return self.sl.get_shape()

    def get_dtype(self):
        return self.sl.get_dtype()

    def __getitem__(self, index):
        x = self.sl[index]
        self.log.append((self.name, x.size))
        return x


class _FileSpy:
    def __init__(self, log, f):
        self.log, self.f = log, f

    def __enter__(self):
        self.f = self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def get_slice(self, name):
        return _SliceSpy(self.log, name, self.f.get_slice(name))

    def __getattr__(self, attr):
        return getattr(self.f, attr)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = llama4.init_random(config(), seed=4)
    llama4.save(model, path)
    return path, model


def test_each_device_reads_only_its_slice(saved, monkeypatch):
    path, ref = saved
    log = []
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _FileSpy(log, real_open(*a, **k)))
    model = llama4.load(path, mesh=mesh(2, 4))
    reads = {}
    for name, n in log:
        reads.setdefault(name, []).append(n)
    sizes = {t.name: int(np.prod(t.shape)) for t in llama4.tensor_map(model.config)}
    assert reads.keys() == sizes.keys()
    for name, ns in reads.items():
        # Every element is read exactly once: replicated tensors once whole, split ones shard
        # by shard (no device reads the whole tensor, no shard is read twice).
        assert sum(ns) == sizes[name], name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert reads[q] == [sizes[q] // 8] * 8  # heads over all 8 devices
    gu = "model.layers.1.feed_forward.experts.gate_up_proj"
    assert reads[gu] == [sizes[gu] // 16] * 16  # (gate, up) x 4 expert groups x 2 column halves
    assert reads["model.layers.1.feed_forward.router.weight"] == [8 * 64]  # replicated: once
    # The shards are the right slices: every parameter equals the single-device one.
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(70, dtype=np.int32)[None] % 512
    assert max_err(model(ids), ref(ids)) < 1e-4


def test_load_casts_on_the_devices_keeping_the_shards(saved):
    path, ref = saved
    model = llama4.load(path, mesh=mesh(4, 2), dtype=jnp.bfloat16)
    w = model.model.layers[3].feed_forward.experts.down_proj[...]
    assert w.dtype == jnp.bfloat16 and w.addressable_shards[0].data.shape == (4, 16, 64)
    want = np.asarray(ref.model.layers[3].feed_forward.experts.down_proj[...]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(w), want)
