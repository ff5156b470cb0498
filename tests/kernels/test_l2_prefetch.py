"""L2 prefetch from the row kernels (:mod:`l2_prefetch`): which boxes, and that carrying
the prefetch CTAs changes no output.

On CPU the kernels run in GPU interpret mode with the prefetch CTAs in place (all but the
prefetch instruction, which the interpreter lacks) and are lowered for CUDA at Scout's decode
shapes with the instruction; on a Hopper GPU their outputs are compared with and without it.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common, fp8, fp8_rows as fr, l2_prefetch as lp

F8 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct


def _covered(spans, parts, ctas):
    """{(part, slot): set of (row, box column) cells} the spans' boxes cover, walking the
    boxes as :func:`l2_prefetch.issue` deals them to ``ctas`` CTAs, and the boxes per CTA."""
    cells, per_cta = {}, [0] * ctas
    for s in spans:
        n = parts[s.part].shape[-2]
        for cta in range(ctas):
            for b in range(lp.first_box(s, cta, ctas), s.n_boxes * s.k_boxes, ctas):
                assert (s.first + b) % ctas == cta
                n0, k0 = s.box(b, n)
                assert 0 <= n0 and n0 + s.rows <= n and k0 % s.cols == 0
                per_cta[cta] += 1
                cells.setdefault((s.part, s.slot), set()).update(
                    itertools.product(range(n0, n0 + s.rows), [k0 // s.cols]))
    return cells, per_cta


@pytest.mark.parametrize("max_bytes,max_groups", [(1 << 20, 1), (3 << 20, 2), (1, 1)])
def test_plan_warms_the_first_columns_of_every_row_within_the_budget(max_bytes, max_groups):
    config = lp.L2Prefetch(max_bytes=max(max_bytes, lp.BOX_BYTES), max_groups=max_groups)
    routed = S((4, 640, 2048), F8)  # N not a multiple of the 256-row box
    whole = S((1, 512, 2048), F8)
    dense = S((256, 1024), jnp.bfloat16)  # 128 bf16 columns a box
    groups = jnp.asarray([2, 4, 2], jnp.int32)
    plan = lp.plan((lp.Target((routed,), groups), lp.Target((whole, dense))), config)
    assert plan.arrays[:3] == (routed, whole, dense) and plan.routed == (4,)
    assert plan.arrays[3].dtype == jnp.int32 and plan.arrays[3].shape == (3,)
    assert [s.slot for s in plan.spans] == [*range(max_groups), 0, 0]
    assert {s.routed for s in plan.spans[:max_groups]} == {0}
    assert plan.spans[-1].routed is None
    k_boxes = {s.k_boxes for s in plan.spans}
    assert len(k_boxes) == 1  # the same column count everywhere (no part hits its K)
    k_boxes = k_boxes.pop()
    row_bytes = (max_groups * 640 + 512 + 256) * lp.BOX_BYTES
    assert k_boxes == max(1, config.max_bytes // row_bytes)
    assert k_boxes * row_bytes <= max(config.max_bytes, row_bytes)
    for s in plan.spans:
        assert s.rows <= lp.BOX_ROWS and s.cols * jnp.dtype(plan.arrays[s.part].dtype).itemsize \
            == lp.BOX_BYTES
    ctas = 7
    cells, per_cta = _covered(plan.spans, plan.arrays, ctas)
    boxes = sum(s.n_boxes * s.k_boxes for s in plan.spans)
    assert sum(per_cta) == boxes and max(per_cta) - min(per_cta) <= 1  # dealt evenly
    assert [s.first for s in plan.spans] == [
        sum(t.n_boxes * t.k_boxes for t in plan.spans[:i]) for i in range(len(plan.spans))]
    for (part, _), got in cells.items():
        n = plan.arrays[part].shape[-2]
        assert got == set(itertools.product(range(n), range(k_boxes)))


def test_plan_stops_at_a_parts_k():
    plan = lp.plan((lp.Target((S((64, 512), F8),)),), lp.L2Prefetch(max_bytes=1 << 30))
    assert plan.spans[0].k_boxes == 2 and plan.spans[0].rows == 64


@pytest.mark.parametrize("part,groups", [
    (S((4, 256, 512), F8), None),  # several experts, none named
    (S((256, 500), F8), None),  # K not a multiple of a box's 256 bytes
    (S((256,), F8), None),
])
def test_plan_refuses_weights_it_cannot_box(part, groups):
    with pytest.raises(ValueError, match="prefetch of a"):
        lp.plan((lp.Target((part,), groups),), lp.L2Prefetch())


def test_config_checks_its_fields():
    for bad in (dict(max_bytes=16), dict(ctas=0), dict(max_groups=0)):
        with pytest.raises(ValueError):
            lp.L2Prefetch(**bad)


def _row_kernel_calls(rows, k, prefetch):
    """Every row kernel that takes a prefetch, at [rows, k] rows, as a list of thunks."""
    ks = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(ks[0], (rows, k), jnp.bfloat16) * 3
    w = jax.random.uniform(ks[1], (k,), jnp.bfloat16, 0.5, 1.5)
    delta = fp8.Unscaled(jax.random.normal(ks[2], (rows, k), jnp.bfloat16),
                         jnp.exp(jax.random.normal(ks[3], (rows,))), None, jnp.bfloat16)
    gu = jax.random.normal(ks[4], (rows, 2 * k), jnp.bfloat16)
    rs = jnp.linspace(0.5, 2.0, rows, dtype=jnp.float32)
    config = fr.RowsConfig(chunk=128)
    kw = dict(impl="mosaic", config=config, prefetch=prefetch)
    return [lambda: fr.quantize(x, **kw), lambda: fr.rms_norm_quantize(x, w, 1e-5, **kw),
            lambda: fr.add_rms_norm_quantize(x, (delta,), w, 1e-5, **kw),
            lambda: fr.swiglu_quantize(gu, None, rs, **kw)]


def test_row_kernels_give_the_same_outputs_with_the_prefetch_ctas(monkeypatch):
    """GPU interpret mode: the extra CTAs (which compute their boxes and experts but cannot
    issue the instruction there) leave every output as it was."""
    rows, k = 3, 256
    experts = jnp.asarray([2, 7, 0], jnp.int32)  # 7: no expert (padding)
    targets = (lp.Target((jnp.ones((4, 512, 256), F8),), experts),
               lp.Target((jnp.ones((1, 256, 256), F8), jnp.ones((384, 512), jnp.bfloat16))))
    plans = []
    plan = lp.plan
    monkeypatch.setattr(lp, "plan", lambda *a: plans.append(a) or plan(*a))
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        plain = [f() for f in _row_kernel_calls(rows, k, None)]
        assert not plans
        warm = lp.Warm(targets, lp.L2Prefetch(max_bytes=1 << 16, ctas=3))
        warmed = [f() for f in _row_kernel_calls(rows, k, warm)]
    assert len(plans) == len(plain)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(warmed)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _scout_sites(rows):
    """Scout's decode sites (one H200, FP8 weights and attention projections) as (function
    of its arguments and a prefetch config or None, its arguments): the input norm warms
    q/k/v, the post-attention norm the shared expert's gate/up, the quantisation of the
    attention output o_proj, the SwiGLU the down projections (the rows' first expert and
    the shared one)."""
    h, i, e = 5120, 8192, 16
    bf16 = lambda *s: S(s, jnp.bfloat16)
    x, w = bf16(rows, h), bf16(h)
    qkv = (lp.Target((S((h, h), F8), S((1024, h), F8), S((1024, h), F8))),)
    shared_gate_up = (lp.Target((S((i, h), F8), S((i, h), F8))),)
    o = (lp.Target((S((h, h), F8),)),)
    down = (lp.Target((S((e, h, i), F8),), S((rows,), jnp.int32)), lp.Target((S((h, i), F8),)))
    warm = lambda t, c: None if c is None else lp.Warm(t, c)

    def norm(x, w, t, c):
        return fr.add_rms_norm_quantize(x, x, w, 1e-5, impl="mosaic", prefetch=warm(t, c))

    return [
        (norm, (x, w, qkv)),
        (norm, (x, w, shared_gate_up)),
        (lambda x, t, c: fr.quantize(x, impl="mosaic", prefetch=warm(t, c)), (x, o)),
        (lambda g, r, t, c: fr.swiglu_quantize(g, None, r, impl="mosaic", prefetch=warm(t, c)),
         (bf16(2 * rows, 2 * i), S((2 * rows,), jnp.float32), down)),
    ]


@pytest.mark.parametrize("rows", [1, 16])
def test_row_kernels_with_prefetch_lower_for_cuda_at_scout_shapes(rows):
    for f, args in _scout_sites(rows):
        g = jax.jit(lambda *a, f=f: f(*a, lp.L2Prefetch()))
        mlir = jax.export.export(g, platforms=["cuda"])(*args).mlir_module()
        assert "cp.async.bulk.prefetch.tensor" in mlir


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("rows", [1, 16])
def test_row_kernels_with_prefetch_on_gpu_equal_the_plain_ones(rows):
    key = iter(jax.random.split(jax.random.key(3), 64))

    def value(a):
        if a.dtype == jnp.int32:
            return jax.random.randint(next(key), a.shape, 0, 17, jnp.int32)
        return (jax.random.normal(next(key), a.shape, jnp.float32) + 2).astype(a.dtype)

    for f, args in _scout_sites(rows):
        args = jax.tree.map(value, args, is_leaf=lambda a: isinstance(a, S))
        plain, warmed = f(*args, None), f(*args, lp.L2Prefetch())
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(warmed)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
