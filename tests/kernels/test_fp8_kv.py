"""The kernels over an FP8 KV cache (float8_e4m3fn pages + per-token, per-KV-head scales).

In GPU interpret mode on small shapes: the decode kernel and the prefill's dequantising
form must give *exactly* what the bf16 kernels give over the dequantised pages (the
in-kernel tile is bf16(k8 * s), the same numbers), and match the float64 oracle over the
dequantised pages; the prefill's default (``S = Q8 K8^T``) matches the oracle over them
with the queries quantised per row as the kernel does. Then CUDA
lowering (``jax.export(..., platforms=["cuda"])``: layout inference, TMA rules, the SMEM
budget) of every configuration the pickers emit for an FP8 cache.
"""

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
from jax.experimental.mosaic.gpu import core as mgpu_core
from jax.experimental.pallas import mosaic_gpu as plgpu

import jaxattn
from jaxattn import kv_quant, planner
from jaxattn.kernels import common, decode, prefill
from jaxattn.planner import WorkList

from attention_cases import (Fp8PvCase, decode_dequantising_to, decode_tiles_as_fp8,
                             decode_with, make_ragged_case, naive_ragged,
                             prefill_dequantising_k, prefill_picked_with)

FP8 = jnp.float8_e4m3fn


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    ipc.reset_gpu_interpret_mode_state()
    yield


def _fp8_case(bounds, q_lens, kv_lens, *, num_tokens, k_gain=1.0, seed=0, in_runs=False):
    """A ragged case whose pages are quantised; keys get a spread of row norms (some rows
    large, some small), so per-row scales matter."""
    rc = make_ragged_case(bounds, q_lens, kv_lens, dtype=np.float32, seed=seed,
                          num_tokens=num_tokens, in_runs=in_runs)
    rng = np.random.default_rng(seed + 1)
    gain = np.exp(rng.uniform(-2, 2, rc.k_pages.shape[:3]))[..., None] * k_gain
    k8, ks = kv_quant.quantize_pages(jnp.asarray(rc.k_pages * gain))
    v8, vs = kv_quant.quantize_pages(jnp.asarray(rc.v_pages))
    return rc, jnp.asarray(rc.q, jnp.bfloat16), (k8, v8, ks, vs)


def _check_against_bf16_and_oracle(bounds, q_lens, kv_lens, *, chunk=None, num_tokens=None,
                                   scale=0.08):
    """The kernels over FP8 pages, both prefill forms:

    * ``PrefillConfig(fp8_qk=False)`` (K and V dequantised to bf16 tiles) and the decode
      kernel with bf16 tiles (``f16_dequant=False``) give exactly what the bf16 kernels give
      over the dequantised pages, and match the oracle over them;
    * the default, ``fp8_qk=True`` (``S = Q8 K8^T``, each query row quantised to e4m3 in
      the kernel), leaves the decode rows as they were and matches the oracle over the
      dequantised pages with the queries quantised per row the same way (kv_quant's rule).
    """
    num_tokens = num_tokens or sum(q_lens) + 5
    rc, q, (k8, v8, ks, vs) = _fp8_case(bounds, q_lens, kv_lens, num_tokens=num_tokens)
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    kw = dict(bounds=bounds, scale=scale, chunk_size=chunk, impl="interpret", return_lse=True)
    with prefill_dequantising_k(), decode_tiles_as_fp8():
        out, lse = jaxattn.ragged_paged_attention(q, k8, v8, *args, k_scale=ks, v_scale=vs,
                                                  **kw)
    kd, vd = kv_quant.dequantize_pages(k8, ks), kv_quant.dequantize_pages(v8, vs)
    with decode_tiles_as_fp8():
        out_bf, lse_bf = jaxattn.ragged_paged_attention(
            q, kd.astype(jnp.bfloat16), vd.astype(jnp.bfloat16), *args, **kw)
    n = int(rc.cu_q_lens[rc.num_seqs])
    out, lse = np.asarray(out, np.float32)[:n], np.asarray(lse)[:n]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.asarray(out_bf, np.float32)[:n])
    np.testing.assert_array_equal(lse, np.asarray(lse_bf)[:n])
    # The oracle over the pages the kernels multiply: bf16(k8 * s).
    kd, vd = (np.asarray(x.astype(jnp.bfloat16), np.float32) for x in (kd, vd))
    want_o, want_l = naive_ragged(np.asarray(q, np.float32), kd, vd,
                                  *args, scale, causal=True, chunk=chunk)
    np.testing.assert_allclose(out, want_o[:n], atol=3e-2, rtol=0)
    np.testing.assert_allclose(lse, want_l[:n], atol=3e-2, rtol=0)
    dec = np.repeat(np.asarray(q_lens) <= bounds.dq, q_lens)  # rows of decode items
    if dec.all():  # the prefill's forms do not enter: the call below would repeat the first
        return

    with decode_tiles_as_fp8():
        out8, lse8 = jaxattn.ragged_paged_attention(q, k8, v8, *args, k_scale=ks, v_scale=vs,
                                                    **kw)
    out8, lse8 = np.asarray(out8, np.float32)[:n], np.asarray(lse8)[:n]
    np.testing.assert_array_equal(out8[dec], out[dec])
    np.testing.assert_array_equal(lse8[dec], lse[dec])
    q8, q_scale = kv_quant.quantize(jnp.asarray(q, jnp.float32))
    want_o, want_l = naive_ragged(np.asarray(kv_quant.dequantize(q8, q_scale)), kd, vd,
                                  *args, scale, causal=True, chunk=chunk)
    np.testing.assert_allclose(out8[~dec], want_o[:n][~dec], atol=5e-2, rtol=0)
    np.testing.assert_allclose(lse8[~dec], want_l[:n][~dec], atol=5e-2, rtol=0)


def _bounds(**kw):
    base = dict(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512, page_size=32,
                num_q_heads=10, num_kv_heads=2, head_dim=128, block_kv=64, num_workers=4,
                min_split_kv=64)
    return jaxattn.Bounds(**{**base, **kw})


def test_fp8_mixed_batch_equals_bf16_kernels_over_dequantised_pages():
    """Prefill rows (a long and a short prompt) and decode rows (one split over KV) in one
    batch: both kernels read the FP8 pages."""
    _check_against_bf16_and_oracle(_bounds(), (150, 1, 1, 37), (200, 260, 33, 37))


def _assert_prefill_forms_agree(forms, *, in_runs=False, check_table=None):
    """The prefill over one case's FP8 pages (a long and a short prompt: prefill items only,
    decode is another kernel) under each of ``forms`` (pick_config's keywords) gives the
    first form's outputs bit for bit. ``check_table``: asserts on the page table first."""
    bounds = _bounds(num_workers=2)  # 32-token pages, 64-key tiles
    q_lens, kv_lens = (150, 37), (200, 37)
    rc, q, (k8, v8, ks, vs) = _fp8_case(bounds, q_lens, kv_lens, num_tokens=200,
                                        in_runs=in_runs)
    if check_table is not None:
        check_table(rc.page_table)
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    n = sum(q_lens)
    got = []
    for form in forms:
        with prefill_picked_with(**form):
            out, lse = jaxattn.ragged_paged_attention(
                q, k8, v8, *args, k_scale=ks, v_scale=vs, bounds=bounds, scale=0.08,
                impl="interpret", return_lse=True)
        got.append((np.asarray(out, np.float32)[:n], np.asarray(lse)[:n]))
    assert np.isfinite(got[0][0]).all()
    for out, lse in got[1:]:
        np.testing.assert_array_equal(got[0][0], out)
        np.testing.assert_array_equal(got[0][1], lse)


def test_fp8_prefill_producer_dequant_equals_the_consumers():
    """``PrefillConfig.producer_dequant`` (the default over an FP8 cache): V dequantised once
    by the producer into a ring both consumers read gives exactly what each consumer
    dequantising its own copy gives, with any ``dequant_vector`` (many
    blocks per tile, so the ring wraps; several tiles per CTA, so it carries across tiles).
    The ``fp8_qk=False`` form with it equals the bf16 kernels over the dequantised pages
    (the tests above)."""
    _assert_prefill_forms_agree([dict(producer_dequant=p, dequant_vector=v)
                                 for p, v in ((True, 2), (False, 2), (True, 8), (False, 4))])


def test_fp8_prefill_merged_page_copies_equal_one_copy_per_page():
    """``PrefillConfig.merge_pages`` over an FP8 cache: a tile of consecutive pages is one
    TMA copy of values (its scale rows still one copy per page); bit-equal to copying
    every page alone."""

    def tiles_of_both_kinds(table):  # 64-key tiles of 32-token pages: 2 pages each
        pairs = table[0, :6].reshape(3, 2)
        assert (np.diff(pairs) == 1).ravel().tolist() == [False, False, True], pairs

    _assert_prefill_forms_agree([dict(merge_pages=m) for m in (True, False)], in_runs=True,
                                check_table=tiles_of_both_kinds)


@pytest.mark.parametrize("fixed", [False, True])
def test_fp8_decode_merged_page_copies_equal_one_copy_per_page(fixed):
    """``DecodeConfig.merge_pages`` over an FP8 cache (decode rows only, the sequences'
    pages in runs): a block of consecutive pages is one TMA copy of values (per-row scales
    still one copy per page; with Llama 4's fixed scales none); bit-equal to copying every
    page alone."""
    bounds = _bounds(num_workers=2)  # 32-token pages, 64-key blocks: 2 pages each
    q_lens, kv_lens = (1, 1, 3), (300, 129, 200)
    rc, q, (k8, v8, ks, vs) = _fp8_case(bounds, q_lens, kv_lens, num_tokens=8, in_runs=True)
    blocks = rc.page_table[0, :10].reshape(5, 2)
    assert (np.diff(blocks) == 1).ravel().tolist() == [False, False, True, True, True]
    told = dict(fixed_k_scale=None, fixed_v_scale=None)
    if fixed:  # pages stored under one power of two each, and the kernels told so
        told = dict(fixed_k_scale=2.0 ** -4, fixed_v_scale=2.0 ** -3)
        k8, ks = kv_quant.quantize_pages(jnp.asarray(rc.k_pages), told["fixed_k_scale"])
        v8, vs = kv_quant.quantize_pages(jnp.asarray(rc.v_pages), told["fixed_v_scale"])
    got = []
    for merge in (True, False):
        with decode_with(merge_pages=merge):
            out, lse = jaxattn.ragged_paged_attention(
                q, k8, v8, rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs, k_scale=ks,
                v_scale=vs, bounds=bounds, scale=0.08, impl="interpret", return_lse=True,
                **told)
        got.append((np.asarray(out, np.float32)[:5], np.asarray(lse)[:5]))
    assert np.isfinite(got[0][0]).all()
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


@pytest.mark.parametrize("chunk,head_dim,in_runs,decode_form,fixed_k", [
    # the default decode form (its dequantising warpgroup, f16 tiles), K and V fixed
    (None, 128, False, {}, True),
    # the consumer dequantising bf16 tiles; only V fixed (a layer whose keys keep per-row
    # scales: Llama4ForCausalLM.fix_kv_scales' fallback)
    (128, 64, True, dict(dequant_warpgroup=False, f16_dequant=False), False),
])
def test_fp8_kernels_told_fixed_scales_give_the_same_numbers(chunk, head_dim, in_runs,
                                                             decode_form, fixed_k):
    """K and V rows stored with one power-of-two scale each (normed keys with
    kv_quant.normed_k_scale, a Llama 4 RoPE layer's; values with the power of two over their
    largest, as a weight bound gives): the kernels told so (``fixed_k_scale``: neither copies
    K's scale rows, both scale S once by the softmax scale times it; ``fixed_v_scale``:
    neither copies V's, both convert its tiles unscaled and normalise by ``scale / l``) give
    bit for bit what they give reading every row's scale, prefill and decode rows of one
    batch, over scattered pages and over runs of them (merged copies), in two decode forms;
    and not what they give told a wrong scale, prefill rows or decode rows (the test can
    fail)."""
    bounds = _bounds(num_workers=2, head_dim=head_dim, chunk_size=chunk)
    q_lens, kv_lens = (150, 1, 37), (200, 90, 37)
    rc = make_ragged_case(bounds, q_lens, kv_lens, dtype=np.float32, seed=3, num_tokens=200,
                          in_runs=in_runs)
    k = rc.k_pages / np.sqrt((rc.k_pages ** 2).mean(-1, keepdims=True))  # L2-normed rows
    fk = kv_quant.normed_k_scale(head_dim) if fixed_k else None
    fv = kv_quant.power_of_two_scale(float(np.abs(rc.v_pages).max()))
    k8, ks = kv_quant.quantize_pages(jnp.asarray(k, jnp.bfloat16), fk)
    v8, vs = kv_quant.quantize_pages(jnp.asarray(rc.v_pages), fv)
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    n = sum(q_lens)

    def run(told_k, told_v):
        with decode_with(**decode_form):
            out, lse = jaxattn.ragged_paged_attention(
                jnp.asarray(rc.q, jnp.bfloat16), k8, v8, *args, k_scale=ks, v_scale=vs,
                fixed_k_scale=told_k, fixed_v_scale=told_v, bounds=bounds, scale=0.08,
                chunk_size=chunk, impl="interpret", return_lse=True)
        return np.asarray(out, np.float32)[:n], np.asarray(lse)[:n]

    (out, lse), (want, want_lse) = run(fk, fv), run(None, None)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    prefill_rows = np.repeat(np.asarray(q_lens) > bounds.dq, q_lens)
    for wrong in ([(fk * 2, fv)] if fixed_k else []) + [(fk, fv * 2)]:
        got, _ = run(*wrong)
        assert not np.array_equal(got[prefill_rows], want[prefill_rows])
        assert not np.array_equal(got[~prefill_rows], want[~prefill_rows])


@pytest.mark.parametrize("name", ["fixed_k_scale", "fixed_v_scale"])
def test_fixed_scales_are_refused_off_fp8_and_off_powers_of_two(name):
    bounds = _bounds()
    rc = make_ragged_case(bounds, (3,), (3,), dtype=np.float32, seed=0, num_tokens=8)
    k8, ks = kv_quant.quantize_pages(jnp.asarray(rc.k_pages))
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    q = jnp.asarray(rc.q, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{name}=0.03 must be a power of two"):
        jaxattn.ragged_paged_attention(q, k8, k8, *args, k_scale=ks, v_scale=ks,
                                       **{name: 0.03}, bounds=bounds, impl="reference")
    bf = jnp.asarray(rc.k_pages, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{name} is for an FP8 cache"):
        jaxattn.ragged_paged_attention(q, bf, bf, *args, **{name: 2.0 ** -5}, bounds=bounds,
                                       impl="reference")


def test_fp8_chunked_local_and_small_pages():
    _check_against_bf16_and_oracle(_bounds(page_size=32, chunk_size=128, num_q_heads=4,
                                           head_dim=64), (100, 1, 1), (260, 200, 9), chunk=128)


def test_fp8_decode_with_the_consumer_dequantising(monkeypatch):
    """``DecodeConfig(dequant_warpgroup=False)``: the consumer dequantises each tile itself
    before its wgmma (the default is a warpgroup of its own, which the tests above run), here
    in vectors of 8 values (8-byte fp8 loads); the same pass, so the result stays bit-equal
    to the bf16 kernel over the dequantised pages."""
    monkeypatch.setattr(decode, "default_config", lambda interpret=False, fp8=False, **_:
                        decode.DecodeConfig(p_in_registers=False, dequant_warpgroup=False,
                                            dequant_vector=8))
    _check_against_bf16_and_oracle(_bounds(), (1, 1, 1, 1), (420, 33, 300, 1))


@pytest.mark.parametrize("config", [
    # one bf16 K and V tile between the dequantising warpgroup and the consumer (K's freed
    # after QK, V's after PV), 128-key blocks of 32-token pages
    dict(block_kv=128, num_stages=2, dequant_stages=1, narrow_tiles=True),
    # a 2-deep dequantised ring under 4 fp8 stages (the default before 2026-12-03)
    dict(num_stages=4, dequant_stages=2, narrow_tiles=True),
    # two consumers on alternate blocks, each with its slot of the dequantised ring
    dict(consumers=2, narrow_tiles=True),
    # tiles dequantised in vectors of 4 and 8 values (4- and 8-byte fp8 loads)
    dict(narrow_tiles=True, dequant_vector=8),
    dict(dequant_vector=4),
    dict(consumers=2),
])
def test_fp8_decode_tuning_variants_equal_bf16(monkeypatch, config):
    """Other ``DecodeConfig`` forms with the dequantising warpgroup: bit-equal to the bf16
    kernel in the same form over the dequantised pages (the race detector runs the two-consumer
    form in tests/kernels/test_decode.py)."""
    cfg = decode.DecodeConfig(p_in_registers=False, dequant_warpgroup=True, **config)
    monkeypatch.setattr(decode, "default_config", lambda interpret=False, fp8=False, **_: cfg)
    _check_against_bf16_and_oracle(_bounds(), (1, 1, 1, 3), (420, 33, 300, 130))


def test_fp8_two_consumer_decode_has_no_races():
    """Two consumers and the dequantising warpgroup (four warpgroups): the race
    detector finds nothing over split and unsplit items of 1 and 3 tokens. (It does not see
    everything: consumer 1 writing its hand-off into the o staging union before waiting for
    ``merge_free`` was not flagged when tried; that protocol rests on the H200 runs.)"""
    bounds = _bounds()
    rc, q, (k8, v8, ks, vs) = _fp8_case(bounds, (1, 1, 3), (420, 33, 130), num_tokens=8)
    plan = planner.plan(bounds, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    cfg = decode.DecodeConfig(p_in_registers=False, dequant_warpgroup=True, narrow_tiles=True,
                              consumers=2, num_ctas=2)
    out, _ = decode.decode_attention(
        q, k8, v8, rc.page_table, plan.decode, bounds=bounds, scale=0.08, config=cfg,
        k_scale=ks, v_scale=vs, interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert not ipc.get_races().races_found


def test_fp8_decode_f16_tiles_are_closer_to_the_oracle_than_bf16():
    """The decode kernel's ``f16_dequant`` (the default: K/V dequantised in f16 arithmetic,
    q and P as f16) against the float64 oracle over the f32-dequantised pages: within the
    FP8 tests' bounds, and its mean errors are below the bf16 tiles': f16 keeps 11
    significant bits where bf16 keeps 8 (a wrong or missing scale would be off by the
    scales' e^+-2 spread). Decode rows split over KV and not, pages shuffled."""
    bounds = _bounds()
    q_lens, kv_lens = (1, 1, 1, 1), (420, 33, 300, 1)
    rc, q, (k8, v8, ks, vs) = _fp8_case(bounds, q_lens, kv_lens, num_tokens=9)
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    n = len(q_lens)
    kd, vd = (np.asarray(kv_quant.dequantize_pages(x8, sc), np.float32)
              for x8, sc in ((k8, ks), (v8, vs)))
    want_o, want_l = naive_ragged(np.asarray(q, np.float32), kd, vd, *args, 0.08, causal=True)
    errors = {}
    for f16 in (False, True):
        with decode_dequantising_to(f16):
            out, lse = jaxattn.ragged_paged_attention(
                q, k8, v8, *args, k_scale=ks, v_scale=vs, bounds=bounds, scale=0.08,
                impl="interpret", return_lse=True)
        err = np.abs(np.asarray(out, np.float32)[:n] - want_o[:n])
        lse_err = np.abs(np.asarray(lse)[:n] - want_l[:n])
        assert err.max() < 5e-2 and lse_err.max() < 5e-2
        errors[f16] = (err.mean(), lse_err.mean())
    assert errors[True][0] < 0.7 * errors[False][0], errors
    assert errors[True][1] < 0.5 * errors[False][1], errors


@pytest.mark.parametrize("fixed_v", [True, False])
def test_fp8_prefill_f16_pv_is_closer_to_the_oracle(fixed_v):
    """``PrefillConfig.f16_pv`` (V's tiles and P as f16 for the PV wgmma), with V under one
    scale (one conversion per pair of values) or per row: against the float64 oracle over
    the f32-dequantised pages, within the bounds the bf16 tiles meet and with a lower mean
    error (f16 keeps 11 significant bits where bf16 keeps 8). Prefill rows: a long prompt
    (many blocks, the masked diagonal) and a short one."""
    bounds = _bounds(num_workers=2)
    q_lens, kv_lens = (150, 37), (200, 37)
    rc, q, (k8, _, ks, _) = _fp8_case(bounds, q_lens, kv_lens, num_tokens=200)
    fv = kv_quant.power_of_two_scale(float(np.abs(rc.v_pages).max())) if fixed_v else None
    v8, vs = kv_quant.quantize_pages(jnp.asarray(rc.v_pages), fv)
    args = (rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    n = sum(q_lens)
    kd, vd = (np.asarray(kv_quant.dequantize_pages(x8, sc), np.float32)
              for x8, sc in ((k8, ks), (v8, vs)))
    q8, q_scale = kv_quant.quantize(jnp.asarray(q, jnp.float32))  # as the fp8 QK takes q
    want, _ = naive_ragged(np.asarray(kv_quant.dequantize(q8, q_scale)), kd, vd, *args, 0.08,
                           causal=True)
    errors = {}
    for f16 in (False, True):
        with prefill_picked_with(f16_pv=f16):
            out = jaxattn.ragged_paged_attention(
                q, k8, v8, *args, k_scale=ks, v_scale=vs, fixed_v_scale=fv, bounds=bounds,
                scale=0.08, impl="interpret")
        err = np.abs(np.asarray(out, np.float32)[:n] - want[:n])
        assert err.max() < 5e-2, (f16, err.max())
        errors[f16] = err.mean()
    print(f"fixed_v={fixed_v}: mean error bf16 tiles / f16 tiles: {errors}")
    assert errors[True] < errors[False], errors


def test_fp8_pv_prefill_matches_the_oracle():
    """``PrefillConfig.fp8_pv`` (P.V as an e4m3 wgmma over V^T pages, P through SMEM at
    P8_GAIN): within the FP8 tests' bound of the f64 oracle, and its mean error within 15x
    the default form's: P keeps 4 significant bits instead of bf16's 8, a rounding 16x as
    coarse on every term (measured 10x: 0.0029 against 0.00029, the cost FP8 attention
    pays for it); with V's keys and D mixed up it is far off (the test can fail)."""
    case = Fp8PvCase(_bounds(num_workers=2, page_size=128, block_kv=128,
                               max_model_len=1024), (150, 37), (200, 37), interpret=True)
    want = case.oracle()
    got, base = case.run(True), case.run(False)
    err, base_err = np.abs(got - want), np.abs(base - want)
    print(f"fp8_pv: max / mean error {err.max():.4f} / {err.mean():.5f}; default "
          f"{base_err.max():.4f} / {base_err.mean():.5f}")
    assert np.isfinite(got).all() and err.max() < 5e-2
    assert err.mean() <= 15 * base_err.mean()
    mixed = jnp.swapaxes(case.vt8, 2, 3).reshape(case.vt8.shape)  # keys and D mixed up
    assert np.abs(case.run(True, v_pages=mixed) - want).mean() > 10 * err.mean()


def test_fp8_pv_refuses_what_it_cannot_read():
    case = Fp8PvCase(_bounds(num_workers=2, page_size=128, block_kv=128,
                               max_model_len=1024), (150, 37), (200, 37), interpret=True)
    with pytest.raises(ValueError, match="takes V transposed"):
        case.run(True, v_pages=case.v8)
    with pytest.raises(ValueError, match="fp8_qk"):
        prefill.PrefillConfig(fp8_qk=False, fp8_pv=True)
    small = Fp8PvCase(_bounds(num_workers=2, block_kv=64, page_size=32), (150, 37),
                        (200, 37), interpret=True)
    with pytest.raises(ValueError, match="one page"):
        small.run(True)


def test_decode_config_refuses_forms_it_cannot_run():
    with pytest.raises(ValueError, match="dequant_stages=0"):
        decode.DecodeConfig(dequant_stages=0)
    with pytest.raises(ValueError, match="must be even"):
        decode.DecodeConfig(consumers=2, num_stages=3)
    with pytest.raises(ValueError, match="consumers=3"):
        decode.DecodeConfig(consumers=3)
    with pytest.raises(ValueError, match="needs dequant_warpgroup"):  # at the call: FP8 pages
        _export_decode(_bounds(), jnp.bfloat16, config=decode.DecodeConfig(consumers=2))


def test_decode_default_configs_for_bf16_and_fp8_caches():
    bounds = _bounds()
    fp8, bf16 = decode.pick_config(bounds, jnp.bfloat16, kv_dtype=FP8), decode.pick_config(
        bounds, jnp.bfloat16)
    assert fp8.dequant_warpgroup and fp8.narrow_tiles and fp8.f16_dequant and fp8.block_kv == 64
    assert not bf16.f16_dequant
    assert not bf16.dequant_warpgroup and not bf16.narrow_tiles
    # bf16: 128-key blocks where pieces start on their boundaries (bounds.block_kv), else 64
    assert bf16.block_kv == 64 and bounds.block_kv == 64
    assert decode.pick_config(_bounds(block_kv=128), jnp.bfloat16).block_kv == 128
    assert decode.pick_config(_bounds(block_kv=256), jnp.bfloat16).block_kv == 128
    assert decode.pick_config(_bounds(block_kv=192), jnp.bfloat16).block_kv == 64


def test_fp8_kernel_refuses_missing_scales():
    bounds = _bounds()
    pages = jnp.zeros((8, 32, 2, 128), FP8)
    with pytest.raises(ValueError, match="k_scale"):
        jaxattn.ragged_paged_attention(jnp.zeros((8, 10, 128), jnp.bfloat16), pages, pages,
                                       np.zeros((4, 16), np.int32), np.zeros(5, np.int32),
                                       np.zeros(4, np.int32), 0, bounds=bounds, impl="interpret")
    with pytest.raises(ValueError, match="needs k_scale"):
        decode.main_kernel(jnp.zeros((8, 10, 128), jnp.bfloat16), pages, pages,
                           jnp.zeros((4, 16), jnp.int32), None, bounds=bounds, scale=0.1)


# --- config pickers and CUDA lowering for an FP8 cache (no GPU needed) ---

def _prefill_configs():
    """What the picker gives an FP8 cache at every tile, head size and dtype, in each form
    (the default ``fp8_qk`` everywhere, with V dequantised by the producer and by each
    consumer; dequantising K and V wherever it fits; at 128-row tiles in bf16 the other V
    vectors and V and P as f16)."""
    picked = []
    for bq, bkv, d, dtype in itertools.product((64, 128), (64, 128), (64, 128),
                                               (jnp.bfloat16, jnp.float16)):
        bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=1024,
                                max_model_len=4096, page_size=64, num_q_heads=8,
                                num_kv_heads=1, head_dim=d, block_q=bq, block_kv=bkv)
        name = f"bq{bq}-bkv{bkv}-d{d}-{jnp.dtype(dtype).name}"
        qk8 = prefill.pick_config(bounds, dtype, FP8)  # V dequantised by the producer
        picked.append(pytest.param(qk8, d, dtype, id=name + "-fp8-qk"))
        own = prefill.pick_config(bounds, dtype, FP8, producer_dequant=False)
        picked.append(pytest.param(own, d, dtype, id=name + "-fp8-qk-consumers-dequant"))
        if bq == 128 and dtype == jnp.bfloat16:  # V in 2- and 4-value vectors (default 8)
            for producer, vector in itertools.product((True, False), (2, 4)):
                cfg = prefill.pick_config(bounds, dtype, FP8, producer_dequant=producer,
                                          dequant_vector=vector)
                picked.append(pytest.param(cfg, d, dtype,
                                           id=f"{name}-vector{vector}-{producer}"))
            for producer in (True, False):  # V's tiles and P as f16
                cfg = prefill.pick_config(bounds, dtype, FP8, producer_dequant=producer,
                                          f16_pv=True)
                picked.append(pytest.param(cfg, d, dtype, id=f"{name}-f16-pv-{producer}"))
        try:
            cfg = prefill.pick_config(bounds, dtype, FP8, fp8_qk=False)
        except ValueError:  # K's dequantised tiles too: no room at 128 keys and D=128
            assert (bkv, d) == (128, 128)
            continue
        picked.append(pytest.param(cfg, d, dtype, id=name))
    return picked


def test_prefill_picker_for_fp8():
    """The default form reads K as it lies (S = Q8 K8^T), so only V's dequantised tiles take
    extra shared memory and the bf16 cache's 128-key tiles fit (2 stages); dequantising K
    and V (``fp8_qk=False``) needs 64-key tiles at D=128."""
    bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=4096,
                            page_size=32, num_q_heads=40, num_kv_heads=8, head_dim=128)
    with pytest.raises(ValueError, match="shared memory"):
        prefill.pick_config(bounds, jnp.bfloat16, FP8, fp8_qk=False)
    b64 = dataclasses.replace(bounds, block_kv=64)
    cfg = prefill.pick_config(b64, jnp.bfloat16, FP8, fp8_qk=False)
    assert not cfg.fp8_qk and cfg.smem_bytes(128, jnp.bfloat16, FP8) <= common.MAX_SMEM
    qk8 = prefill.pick_config(bounds, jnp.bfloat16, FP8)
    assert qk8.fp8_qk and qk8.block_kv == 128 and qk8.smem_bytes(128, jnp.bfloat16, FP8) <= common.MAX_SMEM
    deeper = dataclasses.replace(qk8, num_stages=qk8.num_stages + 1)
    assert deeper.smem_bytes(128, jnp.bfloat16, FP8) > common.MAX_SMEM
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        prefill.pick_config(b64, jnp.bfloat16, jnp.float16)
    assert jaxattn.kernels.unsupported_reason(b64, jnp.bfloat16, FP8) is None


def _export_prefill(cfg, d, dtype, *, causal=True, page_size=64, budget=None,
                    fixed_k_scale=None, fixed_v_scale=None):
    S = jax.ShapeDtypeStruct
    items = WorkList(*[jnp.zeros((4,), jnp.int32)] * 8, count=jnp.int32(0))
    f = functools.partial(prefill.prefill_attention, items=items,
                          zero_ranges=jnp.zeros((1, 2), jnp.int32), config=cfg, scale=0.1,
                          causal=causal, num_workers=132, fixed_k_scale=fixed_k_scale,
                          fixed_v_scale=fixed_v_scale)
    pages, scales = S((8, page_size, 1, d), FP8), S((8, 1, page_size), jnp.float32)
    v_pages = S((8, 1, d, page_size), FP8) if cfg.fp8_pv else pages  # fp8_pv: V transposed
    fn = lambda q, kp, vp, pt, ks, vs: f(q, kp, vp, pt, k_scale=ks, v_scale=vs)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(
        S((256, 8, d), dtype), pages, v_pages, S((2, 4096 // page_size), jnp.int32), scales,
        scales)


@pytest.mark.parametrize("overlap", [True, False])
def test_prefill_fp8_pv_lowers_and_allocates_what_smem_bytes_says(overlap):
    """``PrefillConfig.fp8_pv`` at Scout's shapes (128-key tiles, 128-token pages, both
    scales fixed) lowers for CUDA, with the FA3 overlap (P staged in SMEM for the turn after)
    and without; it allocates what smem_bytes says: no dequantised V ring, an e4m3 P tile
    per consumer."""
    bounds = jaxattn.Bounds(max_num_seqs=16, max_num_batched_tokens=8192,
                            max_model_len=131072, page_size=128, num_q_heads=40,
                            num_kv_heads=8, head_dim=128, chunk_size=8192)
    cfg = dataclasses.replace(prefill.pick_config(bounds, jnp.bfloat16, FP8, fp8_pv=True),
                              overlap=overlap)
    assert cfg.fp8_pv and not cfg.producer_dequant  # (and a deeper ring: 3 stages, not 2)
    fixed = dict(fixed_k_scale=2.0 ** -5, fixed_v_scale=2.0 ** -3)
    assert "mosaic_gpu" in _export_prefill(cfg, 128, jnp.bfloat16, page_size=128,
                                           **fixed).mlir_module()
    with mgpu_core.artificial_shared_memory_limit(0), pytest.raises(Exception) as err:
        _export_prefill(cfg, 128, jnp.bfloat16, page_size=128, **fixed)
    found = re.search(r"smem_bytes=(\d+)", str(err.value))
    rows = (False, False)
    assert found and int(found.group(1)) == cfg.smem_bytes(128, jnp.bfloat16, FP8, rows)
    default = prefill.pick_config(bounds, jnp.bfloat16, FP8)
    assert cfg.num_stages > default.num_stages


@pytest.mark.parametrize("cfg,d,dtype", _prefill_configs())
def test_prefill_fp8_lowers_and_allocates_what_smem_bytes_says(cfg, d, dtype):
    """Every picked FP8 config lowers for CUDA; it and the SMEM-P / mbarrier-turn variant
    interpret mode runs (which may exceed the budget) allocate exactly ``smem_bytes``, and
    told fixed K and V scales, exactly ``smem_bytes`` without the scale rings (less)."""
    assert "mosaic_gpu" in _export_prefill(cfg, d, dtype).mlir_module()
    variant = dataclasses.replace(cfg, p_in_registers=False, overlap=False, named_barriers=False)
    fixed = dict(fixed_k_scale=2.0 ** -5, fixed_v_scale=2.0 ** -3)
    fixed_rows = (not cfg.fp8_qk, False)  # K dequantised in bf16 reads its rows anyway
    for c, kw, rows in ((cfg, {}, (True, True)), (variant, {}, (True, True)),
                        (cfg, fixed, fixed_rows)):
        with mgpu_core.artificial_shared_memory_limit(0), pytest.raises(Exception) as err:
            _export_prefill(c, d, dtype, **kw)
        found = re.search(r"smem_bytes=(\d+)", str(err.value))
        assert found and int(found.group(1)) == c.smem_bytes(d, dtype, FP8, scale_rows=rows)
    assert cfg.smem_bytes(d, dtype, FP8, fixed_rows) < cfg.smem_bytes(d, dtype, FP8)


@pytest.mark.parametrize("page_size", [32, 64, 128, 256])
def test_prefill_fp8_lowers_for_page_sizes(page_size):
    bounds = jaxattn.Bounds(max_num_seqs=16, max_num_batched_tokens=8192, max_model_len=131072,
                            page_size=page_size, num_q_heads=40, num_kv_heads=8, head_dim=128,
                            chunk_size=8192, block_kv=64)
    cfg = prefill.pick_config(bounds, jnp.bfloat16, FP8)
    _export_prefill(cfg, 128, jnp.bfloat16, page_size=page_size)
    # a Llama 4 layer's: S without per-key scaling, V's tiles converted unscaled (and a
    # layer whose keys keep per-row scales)
    _export_prefill(cfg, 128, jnp.bfloat16, page_size=page_size,
                    fixed_k_scale=kv_quant.normed_k_scale(128), fixed_v_scale=2.0 ** -3)
    _export_prefill(cfg, 128, jnp.bfloat16, page_size=page_size, fixed_v_scale=2.0 ** -3)
    if page_size == 32:  # the plain loop (no intra-warpgroup overlap) dequantises too
        _export_prefill(dataclasses.replace(cfg, overlap=False), 128, jnp.bfloat16,
                        page_size=page_size)


def _export_decode(bounds, dtype, *, causal=True, config=None, fixed_k_scale=None,
                   fixed_v_scale=None, out_scale=None):
    cap = planner.capacity(bounds).decode_items
    sds = jax.ShapeDtypeStruct
    items = planner.WorkList(*[sds((cap,), jnp.int32)] * 8, sds((), jnp.int32))
    pool = sds((64, bounds.page_size, bounds.num_kv_heads, bounds.head_dim), FP8)
    scales = sds((64, bounds.num_kv_heads, bounds.page_size), jnp.float32)
    fn = lambda q, k, v, pt, items, ks, vs: decode.decode_attention(
        q, k, v, pt, items, bounds=bounds, scale=0.1, causal=causal, config=config,
        k_scale=ks, v_scale=vs, fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale,
        out_scale=out_scale)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(
        sds((bounds.max_num_batched_tokens, bounds.num_q_heads, bounds.head_dim), dtype), pool,
        pool, sds((bounds.max_num_seqs, bounds.pages_per_seq), jnp.int32), items, scales, scales)


# (Hq, Hkv) per device: Scout at TP 1/2/8 (G=5), and G = 1, 2, 8 models.
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(40, 8), (20, 4), (5, 1), (8, 8), (16, 8), (64, 8)])
def test_decode_fp8_lowers_for_every_planner_config(head_dim, heads):
    for i, page_size in enumerate([32, 64, 128, 256]):
        bounds = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=2048,
                                max_model_len=131072, page_size=page_size,
                                num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                chunk_size=8192)
        config = decode.pick_config(bounds, jnp.bfloat16, kv_dtype=FP8)
        # per-row scales; Llama 4's layers: K's and V's fixed (or V's only, at one page size)
        scales = [(None, None), (kv_quant.normed_k_scale(head_dim), 2.0 ** -3)]
        for fk, fv in scales + [(None, 2.0 ** -3)] * (i == 0):
            exp = _export_decode(bounds, (jnp.bfloat16, jnp.float16)[i % 2],
                                 causal=(i // 2) % 2 == 0, config=config, fixed_k_scale=fk,
                                 fixed_v_scale=fv)
            assert "mosaic_gpu" in exp.mlir_module()
        g = heads[0] // heads[1]
        if i == 0 and decode.out_scale_in_kernel(g, head_dim):  # FP8 rows out (V's scale)
            _export_decode(bounds, jnp.bfloat16, config=config, fixed_v_scale=2.0 ** -3,
                           out_scale=2.0 ** -3)


@pytest.mark.parametrize("config", [
    decode.DecodeConfig(),
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True),
    decode.DecodeConfig(num_stages=3, p_in_registers=True),
    decode.DecodeConfig(num_stages=6, p_in_registers=True),  # benchmarks/fp8_kv.py's variant
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True),  # a dequantising WG
    decode.DecodeConfig(num_stages=5, p_in_registers=True, dequant_warpgroup=True),  # SMEM max
    # a 1-deep dequantised ring (6 stages; 128-key blocks, 2 stages); two consumers
    decode.DecodeConfig(num_stages=6, p_in_registers=True, dequant_warpgroup=True,
                        dequant_stages=1, narrow_tiles=True),
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True, dequant_warpgroup=True,
                        dequant_stages=1, narrow_tiles=True),
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, narrow_tiles=True,
                        consumers=2),
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, consumers=2),
    # f16 operands: the default form, the consumer dequantising, two consumers
    decode.DecodeConfig(num_stages=6, p_in_registers=True, dequant_warpgroup=True,
                        dequant_stages=1, narrow_tiles=True, f16_dequant=True),
    decode.DecodeConfig(p_in_registers=True, f16_dequant=True),
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, narrow_tiles=True,
                        consumers=2, f16_dequant=True),
    # tiles dequantised in vectors of 8 and 4 values (the default), bf16 tiles, the
    # consumer dequantising
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, narrow_tiles=True,
                        f16_dequant=True, dequant_vector=8),
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, narrow_tiles=True,
                        f16_dequant=True, dequant_vector=4),
    decode.DecodeConfig(p_in_registers=True, dequant_warpgroup=True, narrow_tiles=True,
                        dequant_vector=8),
    decode.DecodeConfig(p_in_registers=True, dequant_vector=8),
    # the default form with a block's consecutive pages in one copy (fixed scales below)
    dataclasses.replace(decode.default_config(fp8=True), merge_pages=True),
    # ... and with the combine folded into the main kernel (its merge in the fp8 and
    # dequantised rings' memory; FP8 rows out: on the consumer alone)
    dataclasses.replace(decode.default_config(fp8=True), fold_combine=True),
])
def test_decode_fp8_tuning_variants_lower(config):
    bounds = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=8192,
                            max_model_len=131072, page_size=32, num_q_heads=40,
                            num_kv_heads=8, head_dim=128, chunk_size=8192)
    _export_decode(bounds, jnp.bfloat16, config=config)
    # Llama 4's layers: one K and one V scale (the tiles converted without scales)
    _export_decode(bounds, jnp.bfloat16, config=config, fixed_k_scale=2.0 ** -5,
                   fixed_v_scale=2.0 ** -3)
    # ... writing FP8 rows under V's scale (o_proj's input, llama4.model.STATIC_O_SCALE)
    _export_decode(bounds, jnp.bfloat16, config=config, fixed_k_scale=2.0 ** -5,
                   fixed_v_scale=2.0 ** -3, out_scale=2.0 ** -3)


@pytest.mark.parametrize("page_size", [8, 16])
def test_fp8_kernels_refuse_pages_whose_scale_rows_misalign(page_size):
    """A page's f32 scale row is one TMA copy into shared memory, whose destination must be
    128-byte aligned: pages below the KV tile must be a multiple of 32 tokens (16-token pages
    crashed the H200 with CUDA_ERROR_MISALIGNED_ADDRESS; interpret mode cannot see it)."""
    bounds = jaxattn.Bounds(max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=8192,
                            page_size=page_size, num_q_heads=40, num_kv_heads=8, head_dim=128,
                            block_kv=64)
    for pick in (prefill.pick_config, decode.pick_config):
        with pytest.raises(ValueError, match="multiple of 32"):
            pick(bounds, jnp.bfloat16, kv_dtype=FP8)
        pick(bounds, jnp.bfloat16)  # a bf16 cache is fine with them


def test_fp8_kernels_find_the_needle_in_interpret_mode():
    """The constructed lookup head (tests/needle_cases.py) over a 1k context through the
    kernels (decode rows: one query per sequence)."""
    from needle_cases import make_needle_case

    case = make_needle_case(1024, (0.03, 0.6, 0.97), num_q_heads=2, page_size=32)
    k8, ks = kv_quant.quantize_pages(jnp.asarray(case.k_pages))
    v8, vs = kv_quant.quantize_pages(jnp.asarray(case.v_pages))
    out = jaxattn.ragged_paged_attention(
        jnp.asarray(case.q, jnp.bfloat16), k8, v8, *case.args(), bounds=case.bounds, scale=1.0,
        impl="interpret", k_scale=ks, v_scale=vs)
    np.testing.assert_array_equal(case.read_out(out), case.answers)
