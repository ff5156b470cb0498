"""benchmarks.fp8_kv's pools: shuffled, or a sequence's pages one after another (the
engine's order, which the prefill copies a tile at a time); both hold the same tokens."""

import numpy as np
import pytest

from benchmarks import fp8_kv


@pytest.mark.parametrize("in_order", [False, True])
def test_pools_hold_each_sequence_in_table_order(in_order):
    (k, _), (k8, _, ks, _), table = fp8_kv._cache(2, 3 * fp8_kv.PAGE, in_order=in_order)
    table = np.asarray(table)
    assert sorted(table.ravel()) == list(range(6))
    assert (table.ravel() == np.arange(6)).all() == in_order
    shuffled = fp8_kv._cache(2, 3 * fp8_kv.PAGE, in_order=not in_order)
    # the same draw of pages either way; only where each sequence's pages sit differs
    np.testing.assert_array_equal(np.asarray(k), np.asarray(shuffled[0][0]))
    assert k8.shape == k.shape and ks.shape == (6, fp8_kv.HKV, fp8_kv.PAGE)


def test_per_page_columns_reach_the_table():
    forms = fp8_kv.PREFILL_VARIANTS | fp8_kv.PER_PAGE_VARIANTS
    row = dict(kind="prefill", mode="causal", length=8192, pages="in order",
               max_abs_diff=0.1, vectors_max_abs_diff=0.0)
    for i, n in enumerate(forms):
        row |= {f"{n}_ms": 1.0 + i, f"{n}_tflops": 500.0, f"{n}_over_bf16": 1.0 + i}
    table = fp8_kv.markdown(dict(device="H200", date="2026-12-04", prefill_columns=list(forms),
                                 rows=[row]))
    assert "| bf16_per_page | fp8_v4_per_page | fp8_v8_per_page |" in table
    assert "pages in order | 1.000 (500, 1.000)" in table


def test_merged_decode_columns_reach_the_table():
    """--in-order's decode rows carry each FP8 form in the other way of merging page copies
    (per-row scales merged, fixed scales page by page); shuffled rows leave those cells
    empty."""
    base = dict(kind="decode", batch=32, ctx=8192, bf16_ms=0.36, bf16_tbps=3.0, fp8_ms=0.37,
                fp8_tbps=1.5, fp8_over_bf16=1.03, bf16_narrow_ms=0.4, fp8_wide_ms=0.5,
                fp8_wide_over_bf16=1.4, max_abs_diff=0.01)
    rows = [base | dict(pages="in order", fp8_merged_over_bf16=0.987,
                        fp8_fixed_kv_per_page_over_bf16=0.954), base | dict(pages="shuffled")]
    table = fp8_kv.markdown(dict(device="H100", date="2026-12-07", rows=rows))
    assert "| 32x8192, pages in order | 0.360 (3.00) |" in table
    assert "| 0.987 | 0.954 | 0.01 |" in table
    assert "| 32x8192 | 0.360 (3.00) |" in table and "| nan | nan | 0.01 |" in table


def test_per_page_needs_pages_in_order():
    with pytest.raises(SystemExit):
        fp8_kv.main(["--per-page", "--prefill-only"])


def test_normed_k_columns_read_normed_keys_stored_with_one_scale():
    """``fp8_v8_normed_k`` (and its bf16 twin) read L2-normed keys; the FP8 ones hold the
    normed keys quantised with kv_quant.normed_k_scale, as a Llama 4 RoPE layer's cache."""
    import jax.numpy as jnp

    from jaxattn import kv_quant

    names = ("bf16_normed_k", "fp8_v8_normed_k")
    fns = fp8_kv.prefill_fns("chunked", 256, {n: fp8_kv.PREFILL_VARIANTS[n] for n in names})
    k = np.asarray(fns["bf16_normed_k"][1][1], np.float32)
    np.testing.assert_allclose(np.sqrt((k * k).mean(-1)), 1.0, rtol=2e-2)
    k8 = fns["fp8_v8_normed_k"][1][1]
    assert k8.dtype == kv_quant.FP8
    back = np.asarray(k8, np.float32) * kv_quant.normed_k_scale(fp8_kv.D)
    np.testing.assert_allclose(back, k, rtol=2.0**-4, atol=2.0**-9 * 2.0**-5)


def test_fixed_kv_column_reads_values_stored_with_one_scale(monkeypatch):
    """``fp8_v8_fixed_kv`` reads the normed keys and the values each under one power-of-two
    scale (every Llama 4 layer's cache), and tells the kernels both scales."""
    import jax

    from jaxattn import kernels, kv_quant

    names = ("bf16", "fp8_v8_fixed_kv")
    fns = fp8_kv.prefill_fns("causal", 256, {n: fp8_kv.PREFILL_VARIANTS[n] for n in names})
    v = np.asarray(fns["bf16"][1][2], np.float32)
    v8 = fns["fp8_v8_fixed_kv"][1][2]
    scale = kv_quant.power_of_two_scale(float(np.abs(v).max()))
    assert v8.dtype == kv_quant.FP8 and np.abs(v).max() > kv_quant.FP8_MAX * scale / 2
    back = np.asarray(v8, np.float32) * scale
    np.testing.assert_allclose(back, v, rtol=2.0**-4, atol=2.0**-9 * scale)
    told = []
    monkeypatch.setattr(kernels, "ragged_paged_attention",
                        lambda q, *a, **k: told.append(k) or (q,))
    f, args = fns["fp8_v8_fixed_kv"]
    jax.eval_shape(f, *args)
    assert (told[0]["fixed_k_scale"], told[0]["fixed_v_scale"]) == (
        kv_quant.normed_k_scale(fp8_kv.D), scale)


def test_columns_option_refuses_unknown_names():
    with pytest.raises(SystemExit):
        fp8_kv.main(["--prefill-only", "--columns", "fp8_v8,nope"])


def test_a_table_without_the_vector_columns():
    """--columns may leave out the default and the vector forms: their diffs print as nan."""
    names = ["bf16", "bf16_normed_k", "fp8_v8_fixed_kv"]
    row = dict(kind="prefill", mode="causal", length=8192)
    for n in names:
        row |= {f"{n}_ms": 1.0, f"{n}_tflops": 500.0, f"{n}_over_bf16": 1.0}
    table = fp8_kv.markdown(dict(device="H200", date="2026-12-05", prefill_columns=names,
                                 rows=[row]))
    assert "| causal 8192 | 1.000 (500, 1.000) | 1.000 (500, 1.000) | 1.000 (500, 1.000) " \
           "| nan | nan |" in table


def test_fp8_pv_column_reads_v_transposed_in_128_token_pages(monkeypatch):
    """``fp8_pv_fixed_kv`` (pages in order only): the 32-token pages regrouped four at a time,
    V transposed per page, the table pointing at the same tokens; the prefill kernel told
    fp8_pv and both scales. Shuffled pages: no such column."""
    import jax

    from jaxattn import kv_quant
    from jaxattn.kernels import prefill

    names = ("bf16", "fp8_pv_fixed_kv")
    forms = {n: fp8_kv.PREFILL_VARIANTS[n] for n in names}
    assert "fp8_pv_fixed_kv" not in fp8_kv.prefill_fns("causal", 512, forms)
    fns = fp8_kv.prefill_fns("causal", 512, forms, in_order=True)
    _, (_, k, v, table, _) = fns["bf16"]
    f, (_, k8, vt, table_128, _) = fns["fp8_pv_fixed_kv"]
    assert k8.shape[1] == 128 and vt.shape == (k8.shape[0], fp8_kv.HKV, fp8_kv.D, 128)
    tokens = lambda pages, tab: np.concatenate([np.asarray(pages, np.float32)[p]
                                                for p in np.asarray(tab)[0]])
    vt_tokens = np.concatenate([np.asarray(vt, np.float32)[p].transpose(2, 0, 1)
                                for p in np.asarray(table_128)[0]])  # [tokens, Hkv, D]
    scale = kv_quant.power_of_two_scale(float(np.abs(np.asarray(v, np.float32)).max()))
    np.testing.assert_allclose(vt_tokens * scale, tokens(v, table), rtol=2.0**-4,
                               atol=2.0**-9 * scale)
    told = []
    monkeypatch.setattr(prefill, "prefill_attention",
                        lambda q, *a, **kw: told.append(kw) or (q, None))
    jax.eval_shape(f, *fns["fp8_pv_fixed_kv"][1])
    assert told[0]["config"].fp8_pv and told[0]["fixed_v_scale"] == scale


def test_every_prefill_column_lowers_for_cuda():
    """Each column's function, with the arguments the GPU run gives it (1,024 tokens, pages
    in order, so fp8_pv_fixed_kv is among them), lowers for CUDA: a column cannot break
    unseen until device time is spent on it."""
    import jax

    fns = fp8_kv.prefill_fns("causal", 1024, fp8_kv.PREFILL_VARIANTS, in_order=True)
    assert set(fns) == set(fp8_kv.PREFILL_VARIANTS)
    for name, (f, args) in fns.items():
        assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(*args).mlir_module(), name
