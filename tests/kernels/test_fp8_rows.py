"""The fused row-quantisation kernels against the XLA compositions they replace.

On CPU the Mosaic GPU kernels run in Pallas' GPU interpret mode and are lowered for CUDA;
on a Hopper GPU they run at Scout's decode shapes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.kernels import common, fp8, fp8_rows as fr

SMALL = fr.RowsConfig(chunk=128)  # several chunks per row at test sizes


def _dq(q: fp8.Quantized):
    return np.asarray(fp8.dequantize(q.values, q.scale))


def _assert_quantises(q: fp8.Quantized, want):
    """``q`` is ``want`` (f32 rows) quantised per row: each value within half an e4m3 step
    (1/16 relative for normals, 2^-10 of the row scale for subnormals), plus bf16 noise."""
    want = np.asarray(want, np.float32)
    amax = np.abs(want).max(-1)
    np.testing.assert_allclose(np.asarray(q.scale), np.maximum(amax / 448, 1e-12), rtol=1e-2)
    bound = np.abs(want) * (2**-4 + 2**-7) + np.asarray(q.scale)[..., None] * 2**-9
    assert (np.abs(_dq(q) - want) <= bound).all()


@pytest.mark.parametrize("shape", [(1, 384), (5, 3, 256), (64, 128)])
def test_quantize_kernel_equals_xla(interpret, shape):
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16) * 5
    x = x.at[..., 3].set(0).at[0].set(0)  # an all-zero row: the scale floor, no 0/0
    got = fr.quantize(x, impl="mosaic", config=SMALL)
    want = fr.reference_quantize(x)
    np.testing.assert_array_equal(np.asarray(got.values, np.float32),
                                  np.asarray(want.values, np.float32))
    np.testing.assert_array_equal(got.scale, want.scale)
    assert got.dtype == x.dtype and got.values.shape == shape and got.scale.shape == shape[:-1]


def test_quantize_kernel_caps_the_scale(interpret):
    x = jnp.asarray([[1.0, -900.0, 3.0, 0.5] * 32], jnp.bfloat16)
    got = fr.quantize(x, scale_ub=10.0, impl="mosaic", config=SMALL)
    want = fr.reference_quantize(x, 10.0)
    np.testing.assert_array_equal(np.asarray(got.values, np.float32),
                                  np.asarray(want.values, np.float32))
    assert float(got.scale[0]) == pytest.approx(10.0 / 448)


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_rms_norm_quantize_kernel_equals_xla(interpret, rows):
    k = 640
    x = jax.random.normal(jax.random.key(1), (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(jax.random.key(2), (k,), jnp.bfloat16, 0.5, 1.5)
    h, q = fr.rms_norm_quantize(x, w, 1e-5, impl="mosaic", config=SMALL)
    h_want, q_want = fr.reference_rms_norm_quantize(x, w, 1e-5)
    # HF's roundings (f32 norm, cast, times the weight in bf16): the same numbers up to
    # the order of the sum of squares.
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_want, np.float32),
                               rtol=2**-7)
    _assert_quantises(q, h)
    assert (np.asarray(q.values, np.float32) != np.asarray(q_want.values, np.float32)).mean() < 0.01


@pytest.mark.parametrize("rows", [1, 16])
def test_add_rms_norm_quantize_kernel_equals_xla(interpret, rows):
    """The residual stream's add, then the norm: the sum is XLA's bf16 add exactly, and
    the norm is taken of that rounded sum (as when the add was a kernel of its own)."""
    k = 640
    kx, kd, kw = jax.random.split(jax.random.key(9), 3)
    x = jax.random.normal(kx, (rows, k), jnp.bfloat16) * 3
    delta = jax.random.normal(kd, (rows, k), jnp.bfloat16) * 0.7
    w = jax.random.uniform(kw, (k,), jnp.bfloat16, 0.5, 1.5)
    total, h, q = fr.add_rms_norm_quantize(x, delta, w, 1e-5, impl="mosaic", config=SMALL)
    t_want, h_want, _ = fr.reference_add_rms_norm_quantize(x, delta, w, 1e-5)
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(t_want, np.float32))
    h_alone, _ = fr.rms_norm_quantize(t_want, w, 1e-5, impl="mosaic", config=SMALL)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_alone, np.float32))
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_want, np.float32),
                               rtol=2**-7)
    _assert_quantises(q, h)
    assert total.dtype == h.dtype == x.dtype


def _update_terms(rows, k, key=11):
    """A decode layer's feed-forward update as the model hands it on: the shared expert's
    FP8 product unscaled (f32, row and column scales), the routed experts' (bf16, row
    scales; past one row, the last is bucket padding, unwritten by its kernel: NaN, its
    scale zeroed)."""
    ks = jax.random.split(jax.random.key(key), 5)
    shared = fp8.Unscaled(jax.random.normal(ks[0], (rows, k)) * 300,
                          jnp.exp(jax.random.normal(ks[1], (rows,))) * 1e-3,
                          jnp.exp(jax.random.normal(ks[2], (k,))) * 1e-2, jnp.bfloat16)
    routed = jax.random.normal(ks[3], (rows, k), jnp.bfloat16)
    tokens = max(rows - 1, 1)
    routed = fp8.mask_rows(
        fp8.Unscaled(routed.at[tokens:].set(jnp.nan), jnp.exp(jax.random.normal(ks[4], (rows,))),
                     None, jnp.bfloat16),
        jnp.arange(rows) < tokens)
    return shared, routed


@pytest.mark.parametrize("rows", [1, 16])
def test_add_rms_norm_quantize_applies_unscaled_products_epilogues(interpret, rows):
    """The update as unscaled FP8 products: the kernel scales, rounds and sums them as XLA
    does (fp8.sum_terms), so the sum is XLA's exactly; a padding row stays x."""
    k = 640
    x = jax.random.normal(jax.random.key(9), (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(jax.random.key(10), (k,), jnp.bfloat16, 0.5, 1.5)
    terms = _update_terms(rows, k)
    total, h, q = fr.add_rms_norm_quantize(x, terms, w, 1e-5, impl="mosaic", config=SMALL)
    shared, routed = (t.resolve() for t in terms)
    want = x + (shared + routed)
    assert np.isfinite(np.asarray(want, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(want, np.float32))
    if rows > 1:
        np.testing.assert_array_equal(np.asarray(total[-1]), np.asarray(x[-1] + shared[-1]))
    t_xla, h_xla, _ = fr.add_rms_norm_quantize(x, terms, w, 1e-5, impl="xla")
    np.testing.assert_array_equal(np.asarray(t_xla, np.float32), np.asarray(want, np.float32))
    h_alone, _ = fr.rms_norm_quantize(want, w, 1e-5, impl="mosaic", config=SMALL)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_alone, np.float32))
    _assert_quantises(q, h)


def _stacked_terms(rows, k, key=13):
    """The update as the by-row experts with a shared expert hand it on: one launch's
    products stacked (routed, then shared; bf16, row scales), the routed padding row
    unwritten (NaN) with its scale 0."""
    ks = jax.random.split(jax.random.key(key), 2)
    values = jax.random.normal(ks[0], (2, rows, k), jnp.bfloat16)
    scale = jnp.exp(jax.random.normal(ks[1], (2, rows)))
    if rows > 1:
        values, scale = values.at[0, -1].set(jnp.nan), scale.at[0, -1].set(0.0)
    return fp8.Unscaled(values, scale, None, jnp.bfloat16, stacked=True)


@pytest.mark.parametrize("rows", [1, 16])
def test_add_rms_norm_quantize_sums_a_stacked_term(interpret, rows):
    """A stacked term (one launch's routed and shared products) is the sum of its products,
    each scaled and rounded as a term of its own: the kernel's sum is XLA's exactly, and a
    padding row's NaN stays out."""
    k = 640
    x = jax.random.normal(jax.random.key(9), (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(jax.random.key(10), (k,), jnp.bfloat16, 0.5, 1.5)
    stacked = _stacked_terms(rows, k)
    total, h, q = fr.add_rms_norm_quantize(x, (stacked,), w, 1e-5, impl="mosaic", config=SMALL)
    routed, shared = stacked.unstacked()
    delta = routed.resolve() + shared.resolve()
    want = x + delta
    assert np.isfinite(np.asarray(want, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(stacked.resolve(), np.float32),
                                  np.asarray(delta, np.float32))
    t_xla = fr.add_rms_norm_quantize(x, (stacked,), w, 1e-5, impl="xla")[0]
    np.testing.assert_array_equal(np.asarray(t_xla, np.float32), np.asarray(want, np.float32))
    _assert_quantises(q, h)
    # reshape keeps the stack: [2, rows, k] -> [2, 1, rows, k]
    assert stacked.reshape(1, rows, k).values.shape == (2, 1, rows, k)


def _assert_route_scales(route, h, router, token_scale, valid=None):
    """``route`` (each row's expert, the row scales [2R]) is XLA's
    :func:`fr.reference_route_scales` of ``h``: the expert the same wherever the exact
    logits' top two are more than a bf16 rounding apart (the dot products sum in another
    order), the routed rows' scale within an ulp of the bf16 score there, padding rows
    (``valid`` False) at expert E with a routed scale of 0, the shared rows' scales the
    token scales as they are."""
    expert, scales = (np.asarray(a) for a in route)
    want_expert, want_scales = (np.asarray(a) for a in
                                fr.reference_route_scales(h, router, token_scale, valid))
    rows, e = h.shape[0], router.shape[0]
    assert expert.dtype == np.int32 and scales.dtype == np.float32 and scales.shape == (2 * rows,)
    exact = np.asarray(h, np.float64) @ np.asarray(router, np.float64).T
    top2 = np.sort(exact, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2**-6 * np.abs(top2[:, 1])
    pad = np.zeros(rows, bool) if valid is None else ~np.asarray(valid)
    assert (clear | pad).mean() > 0.5
    np.testing.assert_array_equal(expert[clear | pad], want_expert[clear | pad])
    np.testing.assert_allclose(scales[:rows][clear], want_scales[:rows][clear], rtol=2**-7)
    assert (expert[pad] == e).all() and not scales[:rows][pad].any()
    assert (expert[~pad] < e).all() and scales[:rows][~pad].all()
    np.testing.assert_array_equal(scales[rows:], np.asarray(token_scale, np.float32))


@pytest.mark.parametrize("rows", [1, 16])
def test_add_rms_norm_quantize_routes_top_1(interpret, rows):
    """With a router weight the kernel also routes the normed rows (an MoE's top-1) and
    scales them as :func:`fr.route_scales` does, padding rows to no expert."""
    k = 640
    x = jax.random.normal(jax.random.key(9), (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(jax.random.key(10), (k,), jnp.bfloat16, 0.5, 1.5)
    router = jax.random.normal(jax.random.key(12), (16, k), jnp.bfloat16) * 0.05
    terms = _update_terms(rows, k)
    valid = jnp.arange(rows) % 5 != 3 if rows > 1 else None
    total, h, q, route = fr.add_rms_norm_quantize(x, terms, w, 1e-5, router=router,
                                                  valid=valid, impl="mosaic", config=SMALL)
    want = fr.add_rms_norm_quantize(x, terms, w, 1e-5, impl="mosaic", config=SMALL)
    for got, ref in zip((total, h, q.values, q.scale),
                        (want[0], want[1], want[2].values, want[2].scale)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    _assert_route_scales(route, h, router, q.scale, valid)
    xla = fr.add_rms_norm_quantize(x, terms, w, 1e-5, router=router, valid=valid, impl="xla")
    _assert_route_scales(xla[3], xla[1], router, xla[2].scale, valid)


@pytest.mark.parametrize("rows", [1, 16])
def test_router_in_smem_routes_as_from_global_memory(interpret, rows):
    """RowsConfig.router_in_smem: the router copied into shared memory (before the kernel's
    dependency wait) gives the same results bit for bit."""
    k = 640
    x = jax.random.normal(jax.random.key(9), (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(jax.random.key(10), (k,), jnp.bfloat16, 0.5, 1.5)
    router = jax.random.normal(jax.random.key(12), (16, k), jnp.bfloat16) * 0.05
    valid = jnp.arange(rows) % 5 != 3 if rows > 1 else None

    def run(in_smem):
        return jax.tree.leaves(fr.add_rms_norm_quantize(
            x, _update_terms(rows, k), w, 1e-5, router=router, valid=valid, impl="mosaic",
            config=dataclasses.replace(SMALL, router_in_smem=in_smem)))

    for got, want in zip(run(True), run(False)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_add_rms_norm_quantize_refuses_a_router_on_unflattened_rows():
    x = jnp.zeros((2, 3, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        fr.add_rms_norm_quantize(x, x, jnp.ones(256, jnp.bfloat16), 1e-5,
                                 router=jnp.zeros((16, 256), jnp.bfloat16))


def test_reference_route_sends_padding_rows_to_no_expert():
    """``valid``: rows where it is False get expert E (past the last) and top logit +inf;
    the others route as without it."""
    h = jax.random.normal(jax.random.key(2), (6, 256), jnp.bfloat16)
    router = jax.random.normal(jax.random.key(3), (16, 256), jnp.bfloat16) * 0.05
    valid = jnp.asarray([True, True, False, True, False, False])
    top, expert = fr.reference_route(h, router, valid)
    want_top, want_expert = fr.reference_route(h, router)
    v = np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(expert)[v], np.asarray(want_expert)[v])
    np.testing.assert_array_equal(np.asarray(top)[v], np.asarray(want_top)[v])
    assert (np.asarray(expert)[~v] == 16).all() and np.isposinf(np.asarray(top)[~v]).all()


def test_unscaled_resolves_as_the_scaled_matmul():
    """fp8.Unscaled is the product before scaled_matmul's epilogue, which it then runs."""
    x = jax.random.normal(jax.random.key(1), (5, 256), jnp.bfloat16)
    wq, ws = fp8.quantize(jax.random.normal(jax.random.key(2), (384, 256)) * 0.05, -1)
    deferred = fp8.scaled_matmul(x, wq, ws, defer=True)
    assert isinstance(deferred, fp8.Unscaled) and deferred.values.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(deferred.resolve(), np.float32),
                                  np.asarray(fp8.scaled_matmul(x, wq, ws), np.float32))
    zeroed = fp8.mask_rows(deferred, jnp.arange(5) != 2).resolve()
    assert not np.asarray(zeroed[2], np.float32).any()
    assert np.asarray(zeroed[1], np.float32).any()


@pytest.mark.parametrize("fused,row_scale", [(True, True), (True, False), (False, False)])
def test_swiglu_quantize_kernel_quantises_the_f32_swiglu(interpret, fused, row_scale):
    rows, k = 9, 384
    gate, up = (jax.random.normal(key, (rows, k), jnp.bfloat16) * 2
                for key in jax.random.split(jax.random.key(3), 2))
    rs = jnp.exp(jax.random.normal(jax.random.key(4), (rows,))) if row_scale else None
    args = (jnp.concatenate([gate, up], -1), None) if fused else (gate, up)
    got = fr.swiglu_quantize(*args, rs, impl="mosaic", config=SMALL)
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    if rs is not None:
        g, u = g * rs[:, None], u * rs[:, None]
    _assert_quantises(got, u * g * jax.nn.sigmoid(g))
    # The XLA path (prefill, CPU): the same product in bf16 steps, quantised.
    xla = fr.swiglu_quantize(*args, rs, impl="xla")
    assert np.abs(_dq(xla) - _dq(got)).max() <= 0.1 * np.abs(_dq(got)).max()


@pytest.mark.parametrize("impl", ["mosaic", "xla"])
def test_swiglu_quantize_zeroes_rows_of_zero_scale(interpret, impl):
    """A row scale of 0 (a row of no expert, which the grouped matmul left unwritten: NaN
    here) gives a zero row with scale 0, so the product of it is 0 (fp8.Unscaled's rule)."""
    rows, k = 4, 256
    gu = jax.random.normal(jax.random.key(3), (rows, 2 * k), jnp.bfloat16).at[1].set(jnp.nan)
    rs = jnp.asarray([1.5, 0.0, 0.7, 0.0], jnp.float32)
    got = fr.swiglu_quantize(gu, None, rs, impl=impl, config=SMALL)
    assert np.asarray(got.scale)[[1, 3]].tolist() == [0.0, 0.0]
    assert not np.asarray(got.values[1], np.float32).any()
    assert not np.asarray(got.values[3], np.float32).any()
    keep = np.asarray([0, 2])
    want = fr.swiglu_quantize(gu[keep], None, rs[keep], impl=impl, config=SMALL)
    np.testing.assert_array_equal(np.asarray(got.values[keep], np.float32),
                                  np.asarray(want.values, np.float32))
    np.testing.assert_array_equal(np.asarray(got.scale)[keep], np.asarray(want.scale))


def test_auto_runs_xla_off_hopper_and_for_prefill_sized_calls(monkeypatch):
    monkeypatch.setattr(common, "on_hopper", lambda: True)
    calls = []
    monkeypatch.setattr(fr, "_quantize_kernel", lambda *a, **k: calls.append(a) or (None, None))
    fr.quantize(jnp.ones((65, 128), jnp.bfloat16))  # more rows than max_rows: XLA
    fr.quantize(jnp.ones((4, 96), jnp.bfloat16))  # rows not a multiple of 128: XLA
    assert not calls
    monkeypatch.setattr(common, "on_hopper", lambda: False)
    fr.quantize(jnp.ones((4, 128), jnp.bfloat16))
    assert not calls
    with pytest.raises(ValueError, match="impl"):
        fr.quantize(jnp.ones((4, 128), jnp.bfloat16), impl="triton")
    with pytest.raises(ValueError, match="multiple of 128"):
        fr.quantize(jnp.ones((4, 96), jnp.bfloat16), impl="mosaic")


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_kernels_lower_for_cuda_at_scout_shapes(rows):
    """Scout's decode rows: hidden 5120 (attention in and out, the experts' input), 8192
    intermediate (one launch of gate and up: 16384), and TP=2's 4096 halves."""
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    cases = [
        (lambda x: fr.quantize(x, impl="mosaic"), (bf16(rows, 5120),)),
        (lambda x, w: fr.rms_norm_quantize(x, w, 1e-5, impl="mosaic"),
         (bf16(rows, 5120), bf16(5120))),
        (lambda x, d, w: fr.add_rms_norm_quantize(x, d, w, 1e-5, impl="mosaic"),
         (bf16(rows, 5120), bf16(rows, 5120), bf16(5120))),
        (lambda x, w: fr.add_rms_norm_quantize(x, _update_terms(rows, 5120), w, 1e-5,
                                               impl="mosaic"),
         (bf16(rows, 5120), bf16(5120))),
        *((lambda x, w, r, v, in_smem=in_smem: fr.add_rms_norm_quantize(
            x, _update_terms(rows, 5120), w, 1e-5, router=r, valid=v, impl="mosaic",
            config=fr.RowsConfig(router_in_smem=in_smem)),
           (bf16(rows, 5120), bf16(5120), bf16(16, 5120),
            jax.ShapeDtypeStruct((rows,), jnp.bool_))) for in_smem in (False, True)),
        (lambda x, w: fr.add_rms_norm_quantize(x, (_stacked_terms(rows, 5120),), w, 1e-5,
                                               impl="mosaic"),
         (bf16(rows, 5120), bf16(5120))),
        (lambda g, r: fr.swiglu_quantize(g, None, r, impl="mosaic"),
         (bf16(rows, 16384), jax.ShapeDtypeStruct((rows,), jnp.float32))),
        (lambda g, u: fr.swiglu_quantize(g, u, impl="mosaic"), (bf16(rows, 4096),) * 2),
        (lambda h, r, s, v: fr.route_scales(h, r, s, v, impl="mosaic"),
         (bf16(rows, 5120), bf16(16, 5120), jax.ShapeDtypeStruct((rows,), jnp.float32),
          jax.ShapeDtypeStruct((rows,), jnp.bool_))),
    ]
    for f, args in cases:
        assert "mosaic_gpu" in jax.export.export(jax.jit(f), platforms=["cuda"])(
            *args).mlir_module()


def test_a_router_too_big_for_shared_memory_is_read_from_global_memory():
    """RowsConfig.router_in_smem with a router larger than an SM's 227 KiB of shared memory
    (24 experts x 5120, 240 KiB; Maverick's 128 take 1.25 MiB, and 5x this test's lowering
    time): the routing norm reads it from global memory and lowers, where a copy into
    shared memory would not fit."""
    experts = 24
    assert experts * 5120 * 2 > 227 * 1024 > fr.ROUTER_SMEM_BYTES
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    f = lambda x, w, r, v: fr.add_rms_norm_quantize(
        x, _update_terms(16, 5120), w, 1e-5, router=r, valid=v, impl="mosaic",
        config=fr.RowsConfig(router_in_smem=True))
    assert "mosaic_gpu" in jax.export.export(jax.jit(f), platforms=["cuda"])(
        bf16(16, 5120), bf16(5120), bf16(experts, 5120),
        jax.ShapeDtypeStruct((16,), jnp.bool_)).mlir_module()


def _mosaic_module(monkeypatch, f, *args) -> list[str]:
    """The lines of ``f``'s (last) Mosaic GPU kernel as lowered for CUDA by Pallas and
    Mosaic's Python passes, before the C++ ones: the order of its loads, stores and
    ``bar.sync`` barriers as the GPU compiler gets them."""
    from jax.experimental.mosaic.gpu import core

    modules, lower = [], core.lower_mgpu_module
    monkeypatch.setattr(core, "lower_mgpu_module", lambda module, *a, **k: (
        lower(module, *a, **k), modules.append(str(module)))[0])
    jax.export.export(jax.jit(f), platforms=["cuda"])(*args)
    return modules[-1].splitlines()


def _global_loads(lines):
    return [i for i, line in enumerate(lines) if "vector.load" in line
            and "address_space<workgroup>" not in line]


def _barriers(lines):
    return [i for i, line in enumerate(lines) if "bar.sync" in line]


@pytest.mark.parametrize("joint", [False, True])
def test_router_loads_come_before_its_reductions(monkeypatch, joint):
    """The norm kernel's router issues every global load before the first barrier of its
    expert sums (a cross-warpgroup reduction syncs through shared memory, and no load moves
    across a ``bar.sync``), whether the 16 sums cross the warpgroup one by one or together.
    The norm's own reduction (two barriers) comes before them; session 13's form, a load
    burst between each expert's reductions, had 32. (The router read from global memory:
    RowsConfig.router_in_smem off.)"""
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    config = fr.RowsConfig(router_in_smem=False, joint_router_sums=joint)
    lines = _mosaic_module(monkeypatch, lambda x, d, w, r: fr.add_rms_norm_quantize(
        x, d, w, 1e-5, router=r, impl="mosaic", config=config),
        bf16(16, 5120), bf16(16, 5120), bf16(5120), bf16(16, 5120))
    loads, barriers = _global_loads(lines), _barriers(lines)
    assert len(loads) >= 16 * 5 and len(barriers) > (2 if joint else 2 * 16)
    assert sum(b < loads[-1] for b in barriers) == 2


@pytest.mark.parametrize("joint", [False, True])
def test_joint_router_sums_cross_the_warpgroup_once(monkeypatch, joint):
    """RowsConfig.joint_router_sums: the routing norm's 16 expert sums meet in shared memory
    behind one barrier, where one `jnp.sum` each takes two (the norm's and the
    quantisation's reductions take two each either way). Its numbers: the GPU test."""
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    lines = _mosaic_module(monkeypatch, lambda x, d, w, r: fr.add_rms_norm_quantize(
        x, d, w, 1e-5, router=r, impl="mosaic", config=fr.RowsConfig(joint_router_sums=joint)),
        bf16(16, 5120), bf16(16, 5120), bf16(5120), bf16(16, 5120))
    assert len(_barriers(lines)) == 2 + 2 + (1 if joint else 2 * 16)
    # butterfly shuffles: 5 a sum one at a time, 16 for the 16 together
    assert sum("shfl.sync bfly" in line for line in lines) == 5 * 2 + (16 if joint else 5 * 16)


@pytest.mark.parametrize("kernel,reductions", [("quantize", 1), ("add_rms_norm_quantize", 2),
                                               ("swiglu_quantize", 1)])
def test_row_kernels_sync_only_in_their_reductions(monkeypatch, kernel, reductions):
    """No barrier around the kernels' stores (Pallas's automatic ones were two per output
    chunk: 36 in the norm kernel at Scout's width, 2 x 15 of them for its stores), only the
    two each cross-warpgroup reduction takes (the norm's and the quantisation's absmax)."""
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    f, args = {
        "quantize": (lambda x: fr.quantize(x, impl="mosaic"), (bf16(16, 5120),)),
        "add_rms_norm_quantize": (lambda x, d, w: fr.add_rms_norm_quantize(
            x, d, w, 1e-5, impl="mosaic"), (bf16(16, 5120), bf16(16, 5120), bf16(5120))),
        "swiglu_quantize": (lambda g: fr.swiglu_quantize(g, impl="mosaic"), (bf16(16, 16384),)),
    }[kernel]
    lines = _mosaic_module(monkeypatch, f, *args)
    assert len(_barriers(lines)) == 2 * reductions


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_kernels_on_gpu_at_scout_shapes(rows):
    x = jax.random.normal(jax.random.key(5), (rows, 5120), jnp.bfloat16) * 4
    w = jax.random.uniform(jax.random.key(6), (5120,), jnp.bfloat16, 0.5, 1.5)
    got, want = fr.quantize(x, impl="mosaic"), fr.reference_quantize(x)
    _assert_quantises(got, x.astype(jnp.float32))
    assert (np.asarray(got.values, np.float32) != np.asarray(want.values, np.float32)).mean() < 1e-3
    h, q = fr.rms_norm_quantize(x, w, 1e-5, impl="mosaic")
    h_want, _ = fr.reference_rms_norm_quantize(x, w, 1e-5)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_want, np.float32),
                               rtol=2**-7)
    _assert_quantises(q, h)
    delta = jax.random.normal(jax.random.key(9), (rows, 5120), jnp.bfloat16)
    total, h2, q2 = fr.add_rms_norm_quantize(x, delta, w, 1e-5, impl="mosaic")
    np.testing.assert_array_equal(np.asarray(total, np.float32),
                                  np.asarray(x + delta, np.float32))
    np.testing.assert_array_equal(np.asarray(h2, np.float32), np.asarray(
        fr.rms_norm_quantize(x + delta, w, 1e-5, impl="mosaic")[0], np.float32))
    _assert_quantises(q2, h2)
    terms = _update_terms(rows, 5120)
    # Row r's expert r % 16 gets a push along that row's normed vector, so every row has a
    # clear top-1 (a single random row may not, and then the routing check has nothing to check).
    h_xla = fr.add_rms_norm_quantize(x, terms, w, 1e-5, impl="xla")[1].astype(jnp.float32)
    push = jnp.zeros((16, 5120)).at[jnp.arange(rows) % 16].add(
        h_xla / jnp.linalg.norm(h_xla, axis=-1, keepdims=True))
    router = (jax.random.normal(jax.random.key(12), (16, 5120)) * 0.02 + 0.1 * push
              ).astype(jnp.bfloat16)
    valid = jnp.arange(rows) != 1  # row 1 (where there is one): bucket padding
    total, h3, q3, route = fr.add_rms_norm_quantize(
        x, terms, w, 1e-5, router=router, valid=valid, impl="mosaic",
        config=fr.RowsConfig(router_in_smem=False, joint_router_sums=False))
    in_smem = fr.add_rms_norm_quantize(
        x, terms, w, 1e-5, router=router, valid=valid, impl="mosaic",
        config=fr.RowsConfig(router_in_smem=True, joint_router_sums=False))
    for got, want in zip(jax.tree.leaves(in_smem), jax.tree.leaves((total, h3, q3, route))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # The expert sums in one crossing add in another order: the same rows and experts, the
    # routed scales within a bf16 step of the logit they take the sigmoid of.
    joint = fr.add_rms_norm_quantize(x, terms, w, 1e-5, router=router, valid=valid,
                                     impl="mosaic", config=fr.RowsConfig(joint_router_sums=True))
    for got, want in zip(jax.tree.leaves(joint[:3]), jax.tree.leaves((total, h3, q3))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(joint[3][0], route[0])
    np.testing.assert_allclose(joint[3][1], route[1], rtol=2**-7, atol=0)
    np.testing.assert_array_equal(np.asarray(total, np.float32),
                                  np.asarray(x + fp8.sum_terms(terms), np.float32))
    _assert_quantises(q3, h3)
    _assert_route_scales(route, h3, router, q3.scale, valid)
    _assert_route_scales(joint[3], h3, router, q3.scale, valid)
    np.testing.assert_array_equal(route[0], fr.reference_route_scales(h3, router, q3.scale,
                                                                      valid)[0])  # all clear
    expert, scales = fr.route_scales(h3, router, q3.scale, valid, impl="mosaic")
    want_expert, want_scales = fr.reference_route_scales(h3, router, q3.scale, valid)
    np.testing.assert_array_equal(expert, want_expert)  # every row's top-1 is clear
    np.testing.assert_allclose(scales, want_scales, rtol=2**-7, atol=0)
    stacked = _stacked_terms(rows, 5120)  # the by-row experts' with the shared expert's
    total = fr.add_rms_norm_quantize(x, (stacked,), w, 1e-5, impl="mosaic")[0]
    np.testing.assert_array_equal(np.asarray(total, np.float32),
                                  np.asarray(x + stacked.resolve(), np.float32))
    gu = jax.random.normal(jax.random.key(7), (rows, 16384), jnp.bfloat16) * 2
    rs = jnp.exp(jax.random.normal(jax.random.key(8), (rows,)))
    if rows > 1:  # a row of no expert: unwritten (NaN), its scale 0
        gu, rs = gu.at[-1].set(jnp.nan), rs.at[-1].set(0.0)
    got = fr.swiglu_quantize(gu, None, rs, impl="mosaic")
    g, u = (a.astype(jnp.float32) * rs[:, None] for a in jnp.split(gu, 2, -1))
    live = slice(0, max(rows - 1, 1))
    _assert_quantises(jax.tree.map(lambda a: a[live], got),
                      (u * g * jax.nn.sigmoid(g))[live])
    if rows > 1:
        assert float(got.scale[-1]) == 0 and not np.asarray(got.values[-1], np.float32).any()


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_route_scales_kernel_equals_xla(interpret, rows):
    """The routing kernel gives the XLA composition's experts and scales: the top logit's
    expert (the first of equals), the routed rows' scale times the bf16 sigmoid score, 0
    for padding rows (expert E), then the shared rows' scales as they are."""
    k, e = 256, 16
    h = jax.random.normal(jax.random.key(20), (rows, k), jnp.bfloat16)
    router = jax.random.normal(jax.random.key(21), (e, k), jnp.bfloat16) * 0.05
    router = router.at[2].set(h[0] * 0.1).at[5].set(h[0] * 0.1)  # row 0: 2 and 5 tie, 2 wins
    token_scale = jnp.exp(jax.random.normal(jax.random.key(22), (rows,)))
    valid = jnp.arange(rows) % 3 != 1 if rows > 1 else None
    expert, scales = fr.route_scales(h, router, token_scale, valid, impl="mosaic")
    want_expert, want_scales = fr.reference_route_scales(h, router, token_scale, valid)
    assert expert.dtype == jnp.int32 and scales.shape == (2 * rows,)
    np.testing.assert_array_equal(expert, want_expert)
    # the score is one bf16 rounding of the same sigmoid: at most an ulp apart
    np.testing.assert_allclose(scales, want_scales, rtol=2**-7, atol=0)
    np.testing.assert_array_equal(scales[rows:], token_scale)
    if valid is not None:
        pad = ~np.asarray(valid)
        assert (np.asarray(expert)[pad] == e).all() and not np.asarray(scales)[:rows][pad].any()
        assert (np.asarray(expert)[~pad] < e).all() and np.asarray(scales)[:rows][~pad].all()
    assert int(expert[0]) == 2
