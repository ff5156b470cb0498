"""The split-KV decode kernel on CPU, in Pallas GPU interpret mode.

The real kernel (TMA ring, barriers, wgmma, warp specialization) runs on
small shapes against the float64 oracle. CUDA lowering is in
``test_decode_lowering.py``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

import jaxattn
from jaxattn import executor, planner
from jaxattn.kernels import decode, fp8
from jaxattn.kernels.decode_combine import CombineConfig

from attention_cases import make_ragged_case, naive_ragged

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    ipc.reset_gpu_interpret_mode_state()  # a failed kernel leaves state behind
    yield


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple
    kv_lens: tuple
    num_q_heads: int = 10
    num_kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 16
    dtype: object = jnp.bfloat16
    causal: bool = True
    chunk: int | None = None
    config: decode.DecodeConfig = decode.DecodeConfig(num_ctas=3)
    max_model_len: int = 1024
    min_split_kv: int = 128
    block_kv: int = 128  # planner's split granularity
    num_workers: int = 4  # also sets the combine kernel's workers per (KV head, columns)
    seed: int = 0
    in_runs: bool = False  # the sequences' pages one after another (make_ragged_case)

    def bounds(self):
        return jaxattn.Bounds(
            max_num_seqs=len(self.q_lens) + 1, max_num_batched_tokens=128,
            max_model_len=self.max_model_len, page_size=self.page_size,
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, chunk_size=self.chunk, block_kv=self.block_kv,
            num_workers=self.num_workers, min_split_kv=self.min_split_kv)


def run_case(case: Case, interpret=True, scale=0.15):
    bounds = case.bounds()
    rc = make_ragged_case(bounds, case.q_lens, case.kv_lens, dtype=case.dtype, seed=case.seed,
                          num_tokens=sum(case.q_lens) + 3, in_runs=case.in_runs)
    plan = planner.plan(bounds, rc.cu_q_lens, rc.kv_lens, rc.num_seqs, chunk_size=case.chunk,
                        causal=case.causal)
    fn = jax.jit(lambda q, k, v, pt, items: decode.decode_attention(
        q, k, v, pt, items, bounds=bounds, scale=scale, causal=case.causal,
        interpret=interpret, config=case.config))
    out, lse = fn(jnp.asarray(rc.q), jnp.asarray(rc.k_pages), jnp.asarray(rc.v_pages),
                  rc.page_table, plan.decode)
    return rc, bounds, plan, np.asarray(out, np.float64), np.asarray(lse, np.float64)


def check_case(case: Case, interpret=True):
    rc, bounds, plan, out, lse = run_case(case, interpret)
    want_o, want_l = naive_ragged(*rc.args(), 0.15, causal=case.causal, chunk=case.chunk)
    decode_rows = np.zeros(rc.q.shape[0], bool)
    for s, n in enumerate(case.q_lens):
        if n <= bounds.dq:
            decode_rows[rc.cu_q_lens[s]:rc.cu_q_lens[s + 1]] = True
    assert np.isfinite(out).all()
    got, want = out[decode_rows], want_o[decode_rows]
    err = np.abs(got - want).max(initial=0) / max(1.0, np.abs(want).max(initial=0))
    assert err < TOL[case.dtype], err
    np.testing.assert_allclose(lse[decode_rows], want_l[decode_rows], rtol=1e-4, atol=2e-3)
    # Rows of prefill sequences and padding rows are not the decode list's.
    assert (out[~decode_rows] == 0).all() and (lse[~decode_rows] == -np.inf).all()
    return plan


SCOUT_LIKE = Case(q_lens=(1, 12, 3, 1, 40, 1), kv_lens=(1, 300, 129, 1024, 100, 128))

CASES = {
    # G=5 as Scout, pages 16, contexts 1 / block+1 / max_model_len / page and block edges;
    # one prefill sequence (40 tokens) that the decode list must leave alone.
    "scout_bf16_d128_g5_p16": SCOUT_LIKE,
    # G=8, fp16, D=64, 8-row pages, chunked-local layer (chunk 256) with tokens
    # straddling a chunk boundary (kv 260, q 8 -> positions 252..259).
    "fp16_d64_g8_p8_chunked": Case(q_lens=(1, 8, 2, 5), kv_lens=(257, 260, 256, 700),
                                   num_q_heads=16, head_dim=64, page_size=8,
                                   dtype=jnp.float16, chunk=256),
    # G=1: the tile holds up to 64 tokens of one head; 128-key blocks, 2 stages.
    "bf16_d64_g1_p32_bk128": Case(q_lens=(64, 1, 17), kv_lens=(64, 999, 200),
                                  num_q_heads=2, head_dim=64, page_size=32,
                                  config=decode.DecodeConfig(block_kv=128, num_stages=2,
                                                             num_ctas=2)),
    # Non-causal global attention, G=4, one KV head, 64-row pages.
    "fp16_d128_g4_p64_noncausal": Case(q_lens=(3, 1, 16), kv_lens=(500, 64, 65),
                                       num_q_heads=4, num_kv_heads=1, page_size=64,
                                       dtype=jnp.float16, causal=False),
    # Pages larger than a KV block (128 > 64): a block is a page slice. Non-causal chunked.
    "bf16_d128_g5_p128_noncausal_chunked": Case(q_lens=(2, 1, 12), kv_lens=(300, 1000, 129),
                                                page_size=128, causal=False, chunk=256,
                                                block_kv=128),
    # One CTA walks every tile: the K/V ring wraps across many tile boundaries.
    "one_cta_many_tiles": Case(q_lens=(1,) * 7, kv_lens=(1, 15, 16, 17, 63, 64, 65),
                               head_dim=64, config=decode.DecodeConfig(num_ctas=1)),
    # q_len = dq exactly for G=5 (12 tokens), several splits each.
    # 32 workers: the combine kernel spreads the split parents over several CTAs per
    # (KV head, columns) (with 4, one CTA merges them all, its ring carried across parents).
    "scout_combine_workers": dataclasses.replace(SCOUT_LIKE, num_workers=32),
    # The planner's pieces, 4-8 per parent, merged on one combine CTA per column block.
    "one_cta_many_splits": Case(q_lens=(1, 3, 1, 12, 1), kv_lens=(1000, 700, 1024, 900, 5),
                                block_kv=64, min_split_kv=128, num_workers=16,
                                config=decode.DecodeConfig(num_ctas=1)),
    # One KV head and a split budget of 256 tiles: one-token parents of 55 and 32 pieces,
    # more than (and exactly) the combine's one-token slots (16 a warpgroup of two, 32 with
    # one, 8 with four), so a warpgroup merges a parent in batches; and a two-token parent.
    "many_pieces_a_parent": Case(q_lens=(1, 2, 1), kv_lens=(7000, 3000, 4000),
                                 num_q_heads=4, num_kv_heads=1, head_dim=64, block_kv=64,
                                 min_split_kv=64, num_workers=128, max_model_len=8192,
                                 config=decode.DecodeConfig(num_ctas=8)),
    "fp16_d128_g5_q_eq_dq": Case(q_lens=(12, 12), kv_lens=(12, 1000), dtype=jnp.float16,
                                 min_split_kv=64, block_kv=64),
}
# Tiles of <= 16 query rows with the keys as the wgmma M (DecodeConfig.narrow_tiles, the FP8
# cache's default): one-token items of every group size above, multi-token ones of G=1 and
# G=4, 128-key blocks, a chunk boundary, one CTA over many tiles; wider tiles beside them.
CASES.update({f"{name}_narrow": dataclasses.replace(
    CASES[name], config=dataclasses.replace(CASES[name].config, narrow_tiles=True))
    for name in ("scout_bf16_d128_g5_p16", "fp16_d64_g8_p8_chunked", "bf16_d64_g1_p32_bk128",
                 "fp16_d128_g4_p64_noncausal", "one_cta_many_tiles")})

# Two consumer warpgroups (DecodeConfig.consumers=2) taking alternate blocks, in both tile
# forms: tiles whose blocks start on either parity, tiles of 0-1 blocks (one consumer idle),
# the merge buffer's phases carried across many tiles on one CTA, 128-key blocks.
CASES.update({f"{name}_2c": dataclasses.replace(
    CASES[name], config=dataclasses.replace(CASES[name].config, consumers=2))
    for name in ("scout_bf16_d128_g5_p16", "scout_bf16_d128_g5_p16_narrow",
                 "fp16_d64_g8_p8_chunked_narrow", "bf16_d64_g1_p32_bk128",
                 "one_cta_many_tiles", "one_cta_many_tiles_narrow")})


# The combine kernel's tunings (DecodeConfig.combine; the default shares parents of 4+ pieces
# between 2 warpgroups): a piece in one copy instead of one per token (multi-token pieces
# here); one warpgroup and the exact exp, in 16-column CTAs;
# every parent shared, in 32-column CTAs; 4 warpgroups (one with none of a 2-piece parent's
# pieces); over parents of 2-3 pieces with multi-token items and of the planner's 4-8.
_COMBINES = {"c16_wg1": CombineConfig(cols=16, warpgroups=1, approx_math=False),
             "c32_share2": CombineConfig(cols=32, share_from=2),
             "wg4": CombineConfig(warpgroups=4, share_from=2)}
CASES.update({f"{name}_{tag}": dataclasses.replace(
    CASES[name], config=dataclasses.replace(CASES[name].config, combine=combine))
    for name in ("scout_combine_workers", "one_cta_many_splits", "many_pieces_a_parent")
    for tag, combine in _COMBINES.items()})


# A block's consecutive pages in one copy (DecodeConfig.merge_pages) over pools whose sequences'
# pages run one after another (two swapped in each, so blocks of both kinds): 16- and 8-row
# pages under 64-key blocks, 32-row pages under 128-key ones, a chunk boundary, one CTA over
# many tiles, two consumers, narrow tiles, many splits.
MERGED = ("scout_bf16_d128_g5_p16", "fp16_d64_g8_p8_chunked", "bf16_d64_g1_p32_bk128",
          "one_cta_many_tiles", "scout_bf16_d128_g5_p16_2c", "scout_bf16_d128_g5_p16_narrow",
          "one_cta_many_splits")
CASES.update({f"{name}_merged": dataclasses.replace(
    CASES[name], in_runs=True, config=dataclasses.replace(CASES[name].config, merge_pages=True))
    for name in MERGED})


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpret_matches_oracle(name):
    check_case(CASES[name])


@pytest.mark.parametrize("name", MERGED[:3])
def test_merged_pages_land_what_page_by_page_copies_do(name):
    """merge_pages changes how a block's bytes arrive, not which: bit for bit the per-page
    copies' output over the same pools, which hold blocks of both kinds (the test can tell)."""
    merged = CASES[f"{name}_merged"]
    rc, bounds, plan, out, lse = run_case(merged)
    _, _, _, want, want_lse = run_case(dataclasses.replace(merged, config=dataclasses.replace(
        merged.config, merge_pages=False)))
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    per_block = merged.config.block_kv // bounds.page_size
    runs = set()
    for s, kv in enumerate(merged.kv_lens):
        blocks = rc.page_table[s, :kv // bounds.page_size // per_block * per_block]
        runs |= {bool((np.diff(b) == 1).all()) for b in blocks.reshape(-1, per_block)}
    assert runs == {True, False}


def test_splits_happen_and_match_the_executor():
    """The Scout-like case splits (so the LSE combine runs) and agrees with the plan executor."""
    case = SCOUT_LIKE
    rc, bounds, plan, out, lse = run_case(case)
    assert int((np.asarray(plan.decode.num_splits)[:int(plan.decode.count)] > 1).sum()) >= 2
    ex_o, ex_l = executor.execute_items(
        plan.decode, *map(jnp.asarray, (rc.q, rc.k_pages, rc.v_pages, rc.page_table, rc.kv_lens)),
        bounds=bounds, scale=0.15)
    np.testing.assert_allclose(out, np.asarray(ex_o), atol=2e-2)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(np.asarray(ex_l)))


def test_empty_decode_list():
    """Only prefill sequences: no decode item, every row 0 / -inf."""
    case = Case(q_lens=(40, 20), kv_lens=(100, 20), head_dim=64)
    rc, bounds, plan, out, lse = run_case(case)
    assert int(plan.decode.count) == 0
    assert (out == 0).all() and (lse == -np.inf).all()


@pytest.mark.parametrize("consumers, combine_wgs, merge", [(1, 1, False), (2, 1, False),
                                                          (1, 2, False), (1, 1, True)])
def test_race_detector_finds_no_races(consumers, combine_wgs, merge):
    case = Case(q_lens=(1, 3, 1), kv_lens=(200, 70, 333), head_dim=64, in_runs=merge,
                config=decode.DecodeConfig(num_ctas=2, consumers=consumers, merge_pages=merge,
                                           combine=CombineConfig(warpgroups=combine_wgs,
                                                                 share_from=2)))
    params = plgpu.InterpretGPUParams(detect_races=True)
    run_case(case, interpret=params)
    assert not ipc.get_races().races_found


def test_race_detector_finds_no_races_in_one_token_batches():
    """The combine's one-token windows reach into the next slots' rows: no window is read
    while a copy lands in it, over parents merged in several batches."""
    run_case(CASES["many_pieces_a_parent"], interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert not ipc.get_races().races_found


def test_p_in_registers_refused_under_interpret():
    case = dataclasses.replace(SCOUT_LIKE, config=decode.DecodeConfig(p_in_registers=True))
    with pytest.raises(ValueError, match="p_in_registers"):
        run_case(case)


def test_fold_combine_refused_under_interpret():
    """GPU interpret mode has no atomics for the folded combine's tickets."""
    case = dataclasses.replace(SCOUT_LIKE, config=decode.DecodeConfig(fold_combine=True))
    with pytest.raises(ValueError, match="fold_combine"):
        run_case(case)


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(dtype=jnp.float32),
                                 dict(page_size=24, block_kv=192)])
def test_unsupported_configurations_fail_clearly(bad):
    case = dataclasses.replace(Case(q_lens=(1,), kv_lens=(10,)), **bad)
    with pytest.raises(ValueError):
        run_case(case)


def test_decode_only_skips_the_prefill_pass_with_the_same_numbers():
    """``jaxattn.ragged_paged_attention(decode_only=True)`` (the engine's decode-only step):
    the decode kernel reads q and writes out directly, with no prefill kernel, gather or
    merge, and gives the general path's output and lse bit for bit, padding rows included."""
    case = Case(q_lens=(1, 12, 3, 1), kv_lens=(1, 300, 129, 1024))  # dq = 64 // 5 = 12
    bounds = case.bounds()
    rc = make_ragged_case(bounds, case.q_lens, case.kv_lens, dtype=case.dtype, seed=3,
                          num_tokens=sum(case.q_lens) + 3)
    args = (jnp.asarray(rc.q), jnp.asarray(rc.k_pages), jnp.asarray(rc.v_pages),
            rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    run = lambda **kw: jaxattn.ragged_paged_attention(*args, bounds=bounds, scale=0.15,
                                                      impl="interpret", return_lse=True, **kw)
    out, lse = run()
    out_d, lse_d = run(decode_only=True)
    np.testing.assert_array_equal(np.asarray(out_d, np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse_d), np.asarray(lse))
    prefill = make_ragged_case(bounds, (1, 13), (5, 40), dtype=case.dtype, num_tokens=16)
    with pytest.raises(ValueError, match="13 new tokens, more than decode_q=12"):
        jaxattn.ragged_paged_attention(
            jnp.asarray(prefill.q), jnp.asarray(prefill.k_pages), jnp.asarray(prefill.v_pages),
            prefill.page_table, prefill.cu_q_lens, prefill.kv_lens, prefill.num_seqs,
            bounds=bounds, impl="interpret", decode_only=True)


@pytest.mark.parametrize("name", ["scout_bf16_d128_g5_p16", "scout_bf16_d128_g5_p16_narrow_2c",
                                  "fp16_d64_g8_p8_chunked", "one_cta_many_splits_c32_share2"])
def test_out_scale_writes_fp8_rows(name):
    """``out_scale``: the kernels write FP8 rows under that one scale (unsplit tiles from the
    main kernel, split parents from the combine, zeros where no tile is), within e4m3's
    rounding of the f64 oracle, and agree with quantising the bf16 output to within one of
    its steps (they round the f32 rows, XLA the bf16 ones)."""
    case, out_scale = CASES[name], 2.0 ** -6  # |out| <= max |v| ~ 4.5 < 448 * 2^-6 = 7
    bounds = case.bounds()
    rc = make_ragged_case(bounds, case.q_lens, case.kv_lens, dtype=case.dtype, seed=case.seed,
                          num_tokens=sum(case.q_lens) + 3, in_runs=case.in_runs)
    plan = planner.plan(bounds, rc.cu_q_lens, rc.kv_lens, rc.num_seqs, chunk_size=case.chunk,
                        causal=case.causal)
    run = lambda **kw: jax.jit(lambda q, k, v, pt, items: decode.decode_attention(
        q, k, v, pt, items, bounds=bounds, scale=0.15, causal=case.causal, interpret=True,
        config=case.config, **kw)[0])(jnp.asarray(rc.q), jnp.asarray(rc.k_pages),
                                      jnp.asarray(rc.v_pages), rc.page_table, plan.decode)
    got = run(out_scale=out_scale)
    assert got.dtype == fp8.DTYPE
    got = np.asarray(got, np.float64) * out_scale
    want, _ = naive_ragged(*rc.args(), 0.15, causal=case.causal, chunk=case.chunk)
    decode_rows = np.zeros(rc.q.shape[0], bool)
    for s, n in enumerate(case.q_lens):
        if n <= bounds.dq:
            decode_rows[rc.cu_q_lens[s]:rc.cu_q_lens[s + 1]] = True
    assert (got[~decode_rows] == 0).all()
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative) on top of the bf16 kernel's error
    np.testing.assert_allclose(got[decode_rows], want[decode_rows], rtol=2.0 ** -4 + 2e-2,
                               atol=5e-3)
    via_bf16 = np.asarray(fp8.quantize_fixed(run(), out_scale), np.float64) * out_scale
    np.testing.assert_allclose(got, via_bf16, rtol=2.0 ** -3, atol=2.0 ** -9 * out_scale)
    assert np.mean(got == via_bf16) > 0.9


@pytest.mark.parametrize("decode_only", [False, True])
def test_out_scale_through_the_api(decode_only):
    """``jaxattn.ragged_paged_attention(out_scale=)``: FP8 rows on every path (the decode
    kernels' own in a decode-only call, XLA's quantisation of the output elsewhere and in
    the reference), the one rounding as the kernels'; a scale that is not a power of two is
    refused where it enters."""
    case = Case(q_lens=(1, 12, 3, 1), kv_lens=(1, 300, 129, 1024))
    bounds = case.bounds()
    rc = make_ragged_case(bounds, case.q_lens, case.kv_lens, dtype=case.dtype, seed=3,
                          num_tokens=sum(case.q_lens) + 3)
    args = (jnp.asarray(rc.q), jnp.asarray(rc.k_pages), jnp.asarray(rc.v_pages),
            rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs)
    run = lambda impl, **kw: jaxattn.ragged_paged_attention(*args, bounds=bounds, scale=0.15,
                                                            impl=impl, **kw)
    out_scale = 2.0 ** -6
    got = run("interpret", decode_only=decode_only, out_scale=out_scale)
    ref = run("reference", out_scale=out_scale)
    assert got.dtype == ref.dtype == fp8.DTYPE
    plain = run("interpret", decode_only=decode_only)
    want = np.asarray(fp8.quantize_fixed(plain, out_scale), np.float32)
    if decode_only:  # the kernels round their f32 rows: within one e4m3 step of XLA's
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2.0 ** -3,
                                   atol=2.0 ** -9)
    else:
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=2.0 ** -3 + 2e-2, atol=0.1)
    with pytest.raises(ValueError, match="out_scale"):
        run("interpret", out_scale=0.01)


# Session 59: the V ring is zeroed only where a CTA's first tile does not begin with `stages`
# whole blocks. One CTA over every tile (unsplit), 16-token pages, 64-key blocks in 4 stages
# or 128-key ones in 2: a first tile of 300 keys (its first 4 / 2 blocks whole: no zeroing;
# its short fifth / third block and the 17-key tiles after it land in slots written whole
# before); of 100 keys (its second block short in a slot not yet written: zeroed); and of 240 /
# 241 keys, where the last page copy of the last of those blocks starts at 240 (skipped at
# 240: zeroed; live at 241: not). Interpret mode starts shared memory as NaN, so a short
# block over a slot that was neither zeroed nor written gives a NaN row.
ZEROING = {f"{kv}_{bk}": Case(q_lens=(1, 1), kv_lens=(kv, 17), min_split_kv=1024,
                              block_kv=bk,
                              config=decode.DecodeConfig(num_ctas=1, block_kv=bk,
                                                         num_stages=4 if bk == 64 else 2))
           for kv in (300, 100, 240, 241) for bk in (64, 128)}


@pytest.mark.parametrize("name", sorted(ZEROING))
def test_v_ring_zeroed_only_where_a_short_block_meets_an_unwritten_slot(name):
    plan = check_case(ZEROING[name])
    assert int(plan.decode.count) == 2 and (np.asarray(plan.decode.num_splits)[:2] == 1).all()
