"""The Mosaic GPU prefill kernel on CPU: GPU interpret mode numerics and CUDA lowering.

Interpret mode runs the real kernel (3 warpgroups, TMA ring, barriers) on the
CPU against the float64 NumPy oracle; it cannot execute the register-resident
P operand, so it runs the kernel's SMEM-P variant. Every configuration the
picker can return for the planner is then lowered for CUDA (``jax.export``),
with the register-P variant the GPU uses, which runs the Mosaic layout
inference and the shared-memory budget check.
"""

import dataclasses
import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import core as mgpu_core
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import common, prefill
from jaxattn.planner import WorkList

from attention_cases import make_ragged_case, naive_attention, naive_ragged, prefill_picked_with

TOL = {jnp.bfloat16: 2.5e-2, jnp.float16: 4e-3}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    ipc.reset_gpu_interpret_mode_state()
    yield


def _bounds(hq, hkv, d, chunk=None, **kw):
    base = dict(max_num_seqs=4, max_num_batched_tokens=288, max_model_len=640, page_size=16,
                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, chunk_size=chunk, block_q=128,
                block_kv=128, num_workers=3)
    return jaxattn.Bounds(**{**base, **kw})


def _check(out, lse, want_o, want_l, dtype):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    err = np.abs(out - want_o).max() / max(1.0, np.abs(want_o).max())
    assert err < TOL[dtype], err
    lse = np.asarray(lse)
    finite = np.isfinite(want_l)
    np.testing.assert_allclose(lse[finite], want_l[finite], rtol=2e-4, atol=2e-4)
    assert (lse[~finite] == -np.inf).all()


# (dtype, head_dim, (Hq, Hkv), causal, chunk, q_lens, kv_lens, extra bounds): a covering subset
# of dtypes x head dims x GQA 1/5/8 x causal/non-causal/chunked x ragged lengths. q_len 129 and
# 257 leave 1-row tail items; kv_len > q_len is a prefix (chunked prefill); chunk 128 makes items
# straddle chunk boundaries (1-row segments); page sizes 8/16/64 and block_kv 64/128.
CASES = {
    "bf16-d64-mha-causal": (jnp.bfloat16, 64, (2, 2), True, None, [129, 100], [129, 300], {}),
    "f16-d128-gqa5-chunked": (jnp.float16, 128, (5, 1), True, 128, [200, 17], [600, 17], {}),
    "bf16-d128-gqa8-noncausal": (jnp.bfloat16, 128, (8, 1), False, None, [150, 70], [150, 333], {}),
    "f16-d64-gqa5-noncausal-chunked": (jnp.float16, 64, (5, 1), False, 128,
                                       [257, 31], [300, 95], dict(page_size=8)),
    "bf16-d64-gqa8-causal-bkv64": (jnp.bfloat16, 64, (8, 1), True, None, [70, 9, 130],
                                   [77, 9, 640], dict(block_kv=64, page_size=64)),
    "f16-d128-mha-causal-chunked-bq64": (jnp.float16, 128, (2, 2), True, 128, [129, 65],
                                         [400, 129], dict(block_q=64, block_kv=64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ragged_matches_oracle(name):
    dtype, d, (hq, hkv), causal, chunk, q_lens, kv_lens, extra = CASES[name]
    bounds = _bounds(hq, hkv, d, chunk, decode_q=1, **extra)
    case = make_ragged_case(bounds, q_lens, kv_lens, dtype=dtype, seed=len(name))
    out, lse = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=chunk,
                                              causal=causal, return_lse=True, scale=0.1,
                                              impl="interpret")
    assert out.dtype == dtype
    want_o, want_l = naive_ragged(*case.args(), 0.1, causal=causal, chunk=chunk)
    _check(out, lse, want_o, want_l, dtype)
    n = case.cu_q_lens[case.num_seqs]
    assert (np.asarray(out, np.float32)[n:] == 0).all(), "padding rows must be zeros"


@pytest.mark.slow
def test_mixed_batch_with_decode_rows():
    """Decode (1 and 3 tokens) and prefill sequences in one batch: the two work lists merge."""
    bounds = _bounds(4, 2, 64, 128)
    case = make_ragged_case(bounds, [1, 150, 3, 65], [1, 300, 130, 640], dtype=jnp.bfloat16, seed=2)
    out, lse = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=128,
                                              return_lse=True, impl="interpret")
    want_o, want_l = naive_ragged(*case.args(), 1 / 8, chunk=128)
    _check(out, lse, want_o, want_l, jnp.bfloat16)


# The api-level mixes of tests/test_api.py (decode only, speculative, chunk crossings), at a
# head_dim the kernel supports and with that suite's 64x64 tiles.
API_MIXES = {
    "mixed": ([1, 100, 3, 65, 1], [1, 300, 130, 65, 640]),
    "decode_only": ([1, 1, 2, 1], [63, 64, 65, 500]),
    "prefill_boundaries": ([63, 64, 65, 127], [63, 128, 129, 256]),
    "chunked_prefill": ([200, 17], [600, 17]),
}


@pytest.mark.xdist_group("prefill-api-mixes")  # one worker: the four share one compilation
@pytest.mark.parametrize("mix", list(API_MIXES))
def test_api_mixes(mix):
    bounds = jaxattn.Bounds(max_num_seqs=6, max_num_batched_tokens=320, max_model_len=640,
                            page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64,
                            chunk_size=128, block_q=64, block_kv=64, num_workers=3,
                            min_split_kv=64)
    case = make_ragged_case(bounds, *API_MIXES[mix], dtype=jnp.bfloat16, seed=len(mix))
    out, lse = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=128,
                                              return_lse=True, impl="interpret")
    want_o, want_l = naive_ragged(*case.args(), 1 / 8, chunk=128)
    _check(out, lse, want_o, want_l, jnp.bfloat16)


@pytest.mark.parametrize("order", ["kv_major", "item_major"])
def test_tiles_write_only_their_rows_and_no_races(order):
    """Interpret mode fills fresh outputs with NaN: exactly the prefill rows get written.

    (The default "auto" order, which picks item_major for these small batches and
    kv_major for big ones, runs in every other test.)
    """
    bounds = _bounds(2, 1, 64, decode_q=4)
    case = make_ragged_case(bounds, [150, 3, 70], [300, 5, 70], dtype=jnp.bfloat16, seed=1)
    plan = planner.plan(bounds, case.cu_q_lens, case.kv_lens, case.num_seqs)
    cfg = dataclasses.replace(prefill.pick_config(bounds, jnp.bfloat16), tile_order=order)
    params = plgpu.InterpretGPUParams(detect_races=True)
    out, _ = prefill.prefill_attention(case.q, case.k_pages, case.v_pages, case.page_table,
                                       plan.prefill, np.zeros((0, 2), np.int32), config=cfg,
                                       scale=0.125, causal=True, num_workers=3, interpret=params)
    assert not ipc.get_races().races_found
    written = ~np.isnan(np.asarray(out, np.float32)).any(axis=(1, 2))
    expect = np.zeros(out.shape[0], bool)
    expect[:150] = expect[153:223] = True  # rows 150..152: the decode sequence
    np.testing.assert_array_equal(written, expect)
    want, _ = naive_ragged(*case.args(), 0.125)
    err = np.abs(np.asarray(out, np.float64)[expect] - want[expect]).max()
    assert err < TOL[jnp.bfloat16]


@functools.partial(jax.jit, static_argnames=("hq", "group", "workers", "order", "max_tiles"))
def _schedule(count, *, hq, group, workers, order, max_tiles):
    """[workers, max_tiles] tile ids of each CTA under prefill.tile_schedule, and their items
    and query heads (-1: none); one compilation for every count."""
    cta = jnp.arange(workers)[:, None]
    n, tile_of, item_head = prefill.tile_schedule(count, cta, hq=hq, group=group,
                                                  num_workers=workers, tile_order=order)
    i = jnp.arange(max_tiles)[None, :]
    tiles = jnp.where(i < jnp.reshape(n, (-1, 1)), tile_of(i), -1)
    item, head = item_head(jnp.maximum(tiles, 0))
    return tiles, jnp.where(tiles >= 0, item, -1), jnp.where(tiles >= 0, head, -1)


def _max_tiles(count, hq, group, workers):
    """Tiles the busiest CTA can get: kv_major deals each KV head's tiles on their own."""
    return max(1, (hq // group) * -(-count * group // workers))


@pytest.mark.parametrize("order", prefill.TILE_ORDERS)
@pytest.mark.parametrize("count,hq,group,workers", [
    (157, 40, 5, 132), (128, 40, 5, 132), (3, 2, 2, 3), (200, 20, 5, 132), (7, 8, 8, 5),
    (1, 40, 5, 132), (0, 40, 5, 132), (300, 6, 3, 16), (161, 40, 5, 132)])
def test_tile_schedule_runs_every_tile_once(order, count, hq, group, workers):
    """Each (item, query head) tile runs on exactly one CTA, in every tile order."""
    tiles, item, head = (np.asarray(x) for x in _schedule(
        jnp.int32(count), hq=hq, group=group, workers=workers, order=order,
        max_tiles=_max_tiles(count, hq, group, workers)))
    np.testing.assert_array_equal(np.sort(tiles[tiles >= 0]), np.arange(count * hq))
    pairs = set(zip(item[tiles >= 0].tolist(), head[tiles >= 0].tolist()))
    assert pairs == set(itertools.product(range(count), range(hq)))


@pytest.mark.parametrize("hq", [40, 20])  # Scout's query heads on one device, and at TP=2
def test_kv_major_schedule_balances_causal_prefill(hq):
    """Causal prefill of one sequence (items longest first, a tile costs its KV blocks plus
    one for its fixed work): under the "auto" order the busiest of 132 CTAs does at most
    2% more than the mean at every length from 8k to 128k (below, a few waves of tiles
    cannot be dealt evenly: 4.9% at 4096 tokens on 20 heads). One snake over all KV heads
    (the order before) had 23% at 20000 tokens."""
    workers, group, block = 132, 5, 128
    max_tiles = _max_tiles(131072 // block, hq, group, workers)
    worst = {}
    for length in list(range(8192, 131073, 2039)) + [16384, 20000, 20480]:
        count = -(-length // block)
        cost = np.array([-(-min(length, (i + 1) * block) // block) for i in range(count)])
        cost = cost[::-1] + 1.0  # items longest first
        _, item, _ = _schedule(jnp.int32(count), hq=hq, group=group, workers=workers,
                               order="auto", max_tiles=max_tiles)
        item = np.asarray(item)
        load = np.where(item >= 0, cost[np.maximum(item, 0)], 0).sum(axis=1)
        assert (item >= 0).sum() == count * hq
        worst[length] = load.max() / load.mean()
    assert max(worst.values()) < 1.02, {k: round(v, 3) for k, v in worst.items() if v >= 1.02}


def test_tile_first_pages():
    table = np.array([[4, 5, 6, 7, 9, 8, 10, 11, 12, 13],
                      [0, 1, 2, 3, 3, 4, 5, 6, 7, 8]], np.int32)
    np.testing.assert_array_equal(prefill.tile_first_pages(jnp.asarray(table), 4),
                                  [[4, -1, -1], [0, 3, -1]])  # the last tiles run off the end
    np.testing.assert_array_equal(prefill.tile_first_pages(jnp.asarray(table), 2),
                                  [[4, 6, -1, 10, 12], [0, 2, 3, 5, 7]])


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [16, 32])
def test_merged_page_copies_equal_one_copy_per_page(page_size):
    """``PrefillConfig.merge_pages``: a KV tile whose pages are consecutive in the pool is
    filled by one TMA copy, the others page by page; the output is bit-equal to copying
    every page alone, and matches the oracle."""
    bounds = _bounds(4, 2, 64, None, block_kv=64, page_size=page_size, decode_q=1)
    case = make_ragged_case(bounds, [129, 100], [129, 300], dtype=jnp.bfloat16, seed=5,
                            in_runs=True)
    per_tile = bounds.block_kv // page_size
    runs = [(np.diff(case.page_table[s, :n // page_size].reshape(-1, per_tile)) == 1).all(-1)
            for s, n in enumerate((128, 256))]  # the whole tiles of each sequence
    assert np.concatenate(runs).any() and not np.concatenate(runs).all(), runs  # both kinds
    got = []
    for merge in (True, False):
        with prefill_picked_with(merge_pages=merge):
            got.append(jaxattn.ragged_paged_attention(
                *case.args(), bounds=bounds, causal=True, return_lse=True, scale=0.1,
                impl="interpret"))
    for a, b in zip(*got):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    _check(*got[0], *naive_ragged(*case.args(), 0.1, causal=True), jnp.bfloat16)


def test_a_plan_prepared_with_its_page_table_carries_the_tile_runs():
    """``kernels.prepare(plan, page_table=...)`` finds the prefill's tile runs once (a step
    shares them among its layers); a run over that plan gives the same output as finding
    them in the call, and runs of another table's shape are refused."""
    bounds = _bounds(4, 2, 64, None, block_kv=64, page_size=16, decode_q=1)
    case = make_ragged_case(bounds, [129, 1], [129, 70], dtype=jnp.bfloat16, seed=6,
                            in_runs=True)
    args = case.args()
    table = jnp.asarray(case.page_table)
    plan = planner.plan(bounds, *args[4:])
    kplan = kernels.prepare(plan, bounds=bounds, num_tokens=args[0].shape[0], page_table=table)
    np.testing.assert_array_equal(kplan.first_pages, prefill.tile_first_pages(table, 4))
    assert (np.asarray(kplan.first_pages) >= 0).any()  # some tiles merge
    assert kernels.prepare(plan, bounds=bounds, num_tokens=args[0].shape[0]).first_pages is None
    shared, own = (jaxattn.ragged_paged_attention(*args, bounds=bounds, plan=p, scale=0.1,
                                                  impl="interpret")
                   for p in (kplan, plan))
    np.testing.assert_array_equal(np.asarray(shared, np.float32), np.asarray(own, np.float32))
    with pytest.raises(ValueError, match="first_pages"):  # runs of another table's shape
        jaxattn.ragged_paged_attention(*args, bounds=bounds, scale=0.1, impl="interpret",
                                       plan=kplan._replace(first_pages=kplan.first_pages[1:]))


@pytest.mark.slow
def test_contiguous_attention_with_padding():
    """The contiguous form: identity page table, padded query rows are zeros, prefix kv."""
    rng = np.random.default_rng(3)
    b, lq, lk, hq, hkv, d = 2, 140, 200, 5, 1, 64
    q = rng.standard_normal((b, lq, hq, d)).astype(jnp.bfloat16)
    k = rng.standard_normal((b, lk, hkv, d)).astype(jnp.bfloat16)
    v = rng.standard_normal((b, lk, hkv, d)).astype(jnp.bfloat16)
    q_lens, kv_lens = np.array([140, 100], np.int32), np.array([200, 150], np.int32)
    out, lse = jaxattn.attention(q, k, v, q_lens=q_lens, kv_lens=kv_lens, return_lse=True,
                                 impl="interpret")
    for i in range(b):
        want_o, want_l = naive_attention(np.asarray(q[i, :q_lens[i]], np.float32),
                                         np.asarray(k[i], np.float32), np.asarray(v[i], np.float32),
                                         kv_lens[i], 1 / 8, True, None)
        _check(out[i, :q_lens[i]], lse[i, :q_lens[i]], want_o, want_l, jnp.bfloat16)
        assert (np.asarray(out[i, q_lens[i]:], np.float32) == 0).all()


# --- config picker ---

def test_pick_config_matches_bounds_and_fits_smem():
    for d in (64, 128):
        for bkv in (64, 128):
            bounds = _bounds(8, 1, d, block_kv=bkv)
            cfg = prefill.pick_config(bounds, jnp.bfloat16)
            assert (cfg.block_q, cfg.block_kv) == (bounds.block_q, bounds.block_kv)
            assert cfg.smem_bytes(d, jnp.bfloat16) <= common.MAX_SMEM
            deeper = prefill.PrefillConfig(block_kv=bkv, num_stages=cfg.num_stages + 1)
            assert cfg.num_stages == 4 or deeper.smem_bytes(d, jnp.bfloat16) > common.MAX_SMEM


def _picked_configs():
    """Every config pick_config can return, with the head_dim and dtype it was picked for."""
    picked = []
    for bq, bkv, d, dtype in itertools.product((64, 128), (64, 128, 192, 256), (64, 128),
                                               (jnp.bfloat16, jnp.float16)):
        try:
            cfg = prefill.pick_config(_bounds(8, 1, d, block_q=bq, block_kv=bkv, page_size=64),
                                      dtype)
        except ValueError:  # no K/V ring fits shared memory
            continue
        picked.append(pytest.param(cfg, d, dtype,
                                   id=f"bq{bq}-bkv{bkv}-d{d}-{jnp.dtype(dtype).name}"))
    return picked


def _scratch_sum(scratch):
    """Mosaic GPU's allocation for a scratch list: buffers rounded up to 1 KiB, 8 B per mbarrier."""
    total = 0
    for s in scratch:
        if isinstance(s, plgpu.Barrier):
            total += 8 * math.prod(s.num_barriers)
        elif s is not None:
            total += -(-math.prod(s.shape) * jnp.dtype(s.dtype).itemsize // 1024) * 1024
    return total


def _lowered_smem(cfg, d, dtype):
    """The shared memory the CUDA lowering of the kernel allocates, by Mosaic GPU's own count.

    With an artificial budget of 0 bytes its budget check fails and names the count.
    """
    S = jax.ShapeDtypeStruct
    items = WorkList(*[jnp.zeros((4,), jnp.int32)] * 8, count=jnp.int32(0))
    f = functools.partial(prefill.prefill_attention, items=items,
                          zero_ranges=jnp.zeros((1, 2), jnp.int32), config=cfg, scale=0.1,
                          causal=True, num_workers=132)
    pages = S((8, 64, 1, d), dtype)
    with mgpu_core.artificial_shared_memory_limit(0), pytest.raises(Exception) as err:
        jax.export.export(jax.jit(f), platforms=["cuda"])(S((256, 8, d), dtype), pages, pages,
                                                          S((2, 4), jnp.int32))
    found = re.search(r"smem_bytes=(\d+)", str(err.value))
    assert found, err.value
    return int(found.group(1))


@pytest.mark.parametrize("cfg,d,dtype", _picked_configs())
def test_smem_bytes_is_what_the_kernel_allocates(cfg, d, dtype):
    """smem_bytes (which pick_config budgets with) is the sum over the scratch description,
    and the lowered kernel allocates exactly that: for the picked config and for the SMEM-P /
    mbarrier-turn variant that interpret mode runs."""
    variant = dataclasses.replace(cfg, p_in_registers=False, overlap=False, named_barriers=False)
    for c in (cfg, variant):
        scratch = c.scratch(d, dtype, pages_per_tile=c.block_kv // 64)
        assert c.smem_bytes(d, dtype) == _scratch_sum(scratch)
        assert c.smem_bytes(d, dtype) == _lowered_smem(c, d, dtype)


@pytest.mark.parametrize("kw,match", [
    (dict(d=96), "head_dim"),
    (dict(block_q=256), "block_q"),
    (dict(block_kv=320, page_size=64), "block_kv"),
    (dict(page_size=4, block_kv=64), "page_size"),
])
def test_pick_config_refuses(kw, match):
    d = kw.pop("d", 64)
    with pytest.raises(ValueError, match=match):
        prefill.pick_config(_bounds(2, 1, d, **kw), jnp.bfloat16)


def test_config_validation():
    with pytest.raises(ValueError, match="num_stages"):
        prefill.PrefillConfig(num_stages=1)
    with pytest.raises(ValueError, match="block_kv"):
        prefill.PrefillConfig(block_kv=96)
    with pytest.raises(ValueError, match="tile_order"):
        prefill.PrefillConfig(tile_order="random")
    with pytest.raises(ValueError, match="dequant_vector"):
        prefill.PrefillConfig(dequant_vector=3)
    with pytest.raises(ValueError, match="overlap"):
        prefill.PrefillConfig(p_in_registers=False)  # the default overlap needs register P
    with pytest.raises(ValueError, match="consumer_registers"):
        prefill.PrefillConfig(consumer_registers=256)
    # setmaxnreg.inc waits for registers the producer gave back: the three must sum to the
    # launch allotment of 168 per thread, or the kernel hangs.
    for regs in (168, 224, 232, 240):
        cfg = prefill.PrefillConfig(consumer_registers=regs)
        assert 2 * regs + cfg.producer_registers == 3 * 168 and cfg.producer_registers >= 24
    with pytest.raises(ValueError, match="float32"):
        prefill.pick_config(_bounds(2, 1, 64), jnp.float32)


# --- CUDA lowering of every configuration the planner can emit (no GPU needed) ---

def _export(bounds, dtype, causal, chunk, **override):
    cfg = dataclasses.replace(prefill.pick_config(bounds, dtype), **override)
    cap = planner.capacity(bounds).prefill_items
    t, d = bounds.max_num_batched_tokens, bounds.head_dim
    n_pages = bounds.max_num_seqs * bounds.pages_per_seq

    def f(q, kp, vp, pt, meta, count):
        items = WorkList(*[meta[i] for i in range(8)], count=count)
        return prefill.prefill_attention(q, kp, vp, pt, items, jnp.zeros((1, 2), jnp.int32),
                                         config=cfg, scale=0.1, causal=causal,
                                         num_workers=bounds.num_workers)

    S = jax.ShapeDtypeStruct
    page = (n_pages, bounds.page_size, bounds.num_kv_heads, d)
    args = (S((t, bounds.num_q_heads, d), dtype), S(page, dtype), S(page, dtype),
            S((bounds.max_num_seqs, bounds.pages_per_seq), jnp.int32), S((8, cap), jnp.int32),
            S((), jnp.int32))
    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()
    return cfg


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_kv,page_size", [(128, 16), (64, 64)])
@pytest.mark.parametrize("causal,chunk", [(True, None), (False, None), (True, 8192)])
def test_cuda_lowering(dtype, d, block_kv, page_size, causal, chunk):
    bounds = jaxattn.Bounds(max_num_seqs=16, max_num_batched_tokens=8192, max_model_len=131072,
                            page_size=page_size, num_q_heads=40, num_kv_heads=8, head_dim=d,
                            chunk_size=chunk, block_kv=block_kv)
    _export(bounds, dtype, causal, chunk)


@pytest.mark.parametrize("lq,lk,chunk", [(8191, 8191, None), (10001, 10001, 8192),
                                         (1, 12289, None), (3, 700, 8192), (300, 300, None)])
def test_cuda_lowering_contiguous_any_length(lq, lk, chunk):
    """The contiguous API's one-page-per-sequence view (a tile slices the page; the last one
    reads past it) lowers for CUDA, prefill and decode kernels, at unaligned lengths."""
    S = jax.ShapeDtypeStruct

    def f(q, k, v):
        ql = jnp.full((2,), lq, jnp.int32)
        kl = jnp.full((2,), lk, jnp.int32)
        return kernels.attention(q, k, v, ql, kl, scale=0.1, causal=True, chunk_size=chunk)

    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(
        S((2, lq, 40, 128), jnp.bfloat16), S((2, lk, 8, 128), jnp.bfloat16),
        S((2, lk, 8, 128), jnp.bfloat16))
    assert exported.mlir_module().count("mosaic_gpu") >= 2  # prefill and decode kernels


def test_cuda_lowering_smem_p_variant():
    """The SMEM-P variant (what interpret mode runs) also lowers, where it fits."""
    bounds = _bounds(8, 1, 64, page_size=64)
    cfg = _export(bounds, jnp.bfloat16, True, None, p_in_registers=False, overlap=False)
    assert not cfg.p_in_registers


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("chunk", [None, 8192])
@pytest.mark.parametrize("overlap,named", [(False, True), (True, False)])
def test_cuda_lowering_schedule_variants(d, chunk, overlap, named):
    """The plain (no intra-warpgroup overlap) loop and the mbarrier turns lower on the GPU too."""
    bounds = jaxattn.Bounds(max_num_seqs=16, max_num_batched_tokens=8192, max_model_len=131072,
                            page_size=64, num_q_heads=40, num_kv_heads=8, head_dim=d,
                            chunk_size=chunk)
    cfg = _export(bounds, jnp.bfloat16, True, chunk, overlap=overlap, named_barriers=named)
    assert (cfg.overlap, cfg.named_barriers) == (overlap, named)


def test_oversized_config_is_refused_by_the_lowering():
    """The SMEM estimate agrees with Mosaic's own budget check."""
    cfg = prefill.PrefillConfig(block_kv=128, num_stages=3)
    assert cfg.smem_bytes(128, jnp.bfloat16) > common.MAX_SMEM
    S = jax.ShapeDtypeStruct
    items = WorkList(*[jnp.zeros((4,), jnp.int32)] * 8, count=jnp.int32(0))
    f = functools.partial(prefill.prefill_attention, items=items,
                          zero_ranges=jnp.zeros((1, 2), jnp.int32), config=cfg, scale=0.1,
                          causal=True, num_workers=132)
    with pytest.raises(Exception, match="shared memory"):
        jax.export.export(jax.jit(f), platforms=["cuda"])(
            S((256, 8, 128), jnp.bfloat16), S((8, 64, 1, 128), jnp.bfloat16),
            S((8, 64, 1, 128), jnp.bfloat16), S((2, 4), jnp.int32))
