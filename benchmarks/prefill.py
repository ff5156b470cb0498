"""Prefill attention benchmark: jaxattn vs cuDNN vs JAX's reference Mosaic GPU kernel.

Run on the GPU with ``bash benchmarks/gpu.sh prefill`` (or ``python -m benchmarks.prefill``).
Llama 4 Scout heads (40 query / 8 KV, head_dim 128), batch 1, lengths 4k..128k:

* causal (global NoPE layers): jaxattn bf16, cuDNN bf16, ``attention_mgpu`` fp16;
* chunked-local 8192 (RoPE layers): jaxattn on the whole sequence vs the same-run
  stand-in for cuDNN (the sequence reshaped into a batch of 8192-token causal chunks);
* lengths that are not multiples of anything (boundaries and random lengths, seed 19):
  jaxattn and cuDNN in turn ``OFF_GRID_ROUNDS`` times (3), medians compared, each side's
  spread reported; ``OFF_GRID_LENGTHS`` runs chosen causal lengths alone;
* packed varlen: mixed lengths in one ragged batch vs one sequence of the same work;
* kernel variants (block_kv / stages / tile order) at a few shapes;
* sustained load: jaxattn and cuDNN back to back for seconds at 32k causal, with the SM
  clock and power draw nvidia-smi reports (an H100 at its power limit lowers its clock);
* only with ``BENCH_PARTS=orders``: causal 8k-16k (or ``ORDER_CASES``, e.g.
  "chunked:32768,chunked:131072"), every tile order and cuDNN in turn, three rounds in one
  run (whether "auto" picks the right order there, past run-to-run spread);
* only with ``BENCH_PARTS=paging``: chunked 128k and causal 8k / 32k (or ``PAGING_CASES``)
  through the contiguous API and over 32-token pages (shuffled, in order) and 128-token
  shuffled pages, in turn three rounds in one run (what a page table costs, per case).

Times are GPU time from CUPTI (all kernels of one call, the planner's included), median
over repetitions after warm-up; wall clock where CUPTI is unavailable. TFLOP/s =
4*Lq*Lkv*Hq*D / time, halved for causal; chunked counts only the useful diagonal chunks.
Writes ``benchmarks/results/prefill-<date><BENCH_TAG>.{json,md,png}``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from benchmarks.common import GpuClockLog, gpu_rounds, mode_lengths, time_kernels_alone
from jaxattn import kernels
from jaxattn.kernels import prefill

HQ, HKV, D, CHUNK = 40, 8, 128, 8192
LENGTHS = [int(x) for x in os.environ.get("BENCH_LENGTHS", "4096,8192,16384,32768,65536,131072").split(",")]
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "1e9"))
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
T0 = time.time()
SUSTAIN_S = float(os.environ.get("BENCH_SUSTAIN_S", "6"))
CLOCKS: GpuClockLog | None = None  # started by main()


def log(*a):
    print(*a, flush=True)


def _clocks(t0, t1):
    return CLOCKS.window(t0, t1) if CLOCKS else None


def _measure(f, *args, target_ms=800.0):
    """Median GPU ms of f(*args) (CUPTI: sum of the call's kernels), after warm-up.

    Returns dict(ms, timer, reps, clocks): clocks is the GPU's SM clock and power
    while the repetitions ran (None when too short for a sample)."""
    out = f(*args)  # compile + warm-up
    jax.block_until_ready(out)
    out_bytes = sum(x.nbytes for x in jax.tree.leaves(out))
    del out
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    est = (time.perf_counter() - t) * 1e3
    reps = int(min(50, max(5, target_ms / max(est, 1e-3))))
    # CUPTI's measure keeps every repetition's output alive: stay within ~12 GB.
    reps = max(3, min(reps, int(12e9 // max(out_bytes, 1))))
    t0 = time.time()
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(f, iterations=reps)(*args)
        if times:
            return dict(ms=statistics.median(times), timer="cupti", reps=reps,
                        clocks=_clocks(t0, time.time()))
    except Exception as e:  # noqa: BLE001 - fall back to wall clock
        log("cupti unavailable:", type(e).__name__, str(e)[:120])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), timer="wall", reps=reps, clocks=_clocks(t0, time.time()))


def _kernel_breakdown(f, *args):
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, per = profiler.measure(f, aggregate=False)(*args)
        return [(name[:60], round(ms, 4)) for name, ms in per]
    except Exception:  # noqa: BLE001
        return None


def causal_flops(lq, lk):
    return 4 * lq * lk * HQ * D / 2


def chunked_flops(length):
    n_full, rest = divmod(length, CHUNK)
    return n_full * causal_flops(CHUNK, CHUNK) + causal_flops(rest, rest)


def _inputs(length, dtype, batch=1):
    kq, kk, kv = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(kq, (batch, length, HQ, D), dtype)
    k = jax.random.normal(kk, (batch, length, HKV, D), dtype)
    v = jax.random.normal(kv, (batch, length, HKV, D), dtype)
    return q, k, v


def jaxattn_fn(chunk, config=None):
    if config is None:
        return jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, causal=True, chunk_size=chunk,
                                                         impl="mosaic"))

    def f(q, k, v):
        b, lq = q.shape[:2]
        ql = jnp.full((b,), lq, jnp.int32)
        kl = jnp.full((b,), k.shape[1], jnp.int32)
        return kernels.attention(q, k, v, ql, kl, scale=1 / np.sqrt(D), causal=True,
                                 chunk_size=chunk, config=config)[0]
    return jax.jit(f)


def cudnn_fn(chunked):
    def f(q, k, v):
        if chunked:
            b, l = q.shape[:2]
            q, k, v = (x.reshape(b * l // CHUNK, CHUNK, *x.shape[2:]) for x in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.jit(f)


def mgpu_fn(chunked):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)

    def f(q, k, v):
        if chunked:
            b, l = q.shape[:2]
            q, k, v = (x.reshape(b * l // CHUNK, CHUNK, *x.shape[2:]) for x in (q, k, v))
        return am.attention(q, k, v, cfg)
    return f  # already jitted inside


def _max_err(a, b):
    return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())


def bench_lengths(rows):
    for mode in ("causal", "chunked"):
        for length in LENGTHS:
            if time.time() - T0 > BUDGET_S:
                log("budget reached; skipping", mode, length)
                return
            chunked = mode == "chunked"
            flops = chunked_flops(length) if chunked else causal_flops(length, length)
            q, k, v = _inputs(length, jnp.bfloat16)
            entry = dict(mode=mode, length=length, flops=flops)
            outs = {}
            if chunked and length < CHUNK:
                continue  # a single partial chunk: the causal row already measures it
            for name, make, dt in (("jaxattn", lambda: jaxattn_fn(CHUNK if chunked else None), None),
                                   ("cudnn", lambda: cudnn_fn(chunked), None),
                                   ("mgpu_fp16", lambda: mgpu_fn(chunked), jnp.float16)):
                if name == "mgpu_fp16" and length not in ((32768, 131072) if chunked else
                                                          (4096, 8192, 16384, 32768, 131072)):
                    continue
                try:
                    args = (q, k, v) if dt is None else tuple(x.astype(dt) for x in (q, k, v))
                    if name == "mgpu_fp16":  # no scale parameter: pre-scale q
                        args = (args[0] * jnp.asarray(1 / np.sqrt(D), dt), *args[1:])
                    f = make()
                    m = _measure(f, *args)
                    entry[name] = dict(m, tflops=flops / m["ms"] / 1e9)
                    outs[name] = f(*args)
                except Exception as e:  # noqa: BLE001 - record and go on
                    entry[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc(limit=3)
            if "jaxattn" in outs and "cudnn" in outs:
                entry["max_abs_diff_vs_cudnn"] = _max_err(outs["jaxattn"], outs["cudnn"].reshape(outs["jaxattn"].shape))
            if "ms" in entry.get("jaxattn", {}) and "ms" in entry.get("cudnn", {}):
                entry["ratio_vs_cudnn"] = entry["cudnn"]["ms"] / entry["jaxattn"]["ms"]
            if length in (4096, 32768) or (chunked and length == 131072):
                entry["jaxattn_kernels"] = _kernel_breakdown(jaxattn_fn(CHUNK if chunked else None), q, k, v)
                log("  kernels:", entry["jaxattn_kernels"])
            rows.append(entry)
            log(_fmt_row(entry))
            del q, k, v, outs


# Lengths users send: the issue-19 boundaries and random lengths (fixed seed), not multiples
# of anything. Both paths: the contiguous API (vs cuDNN) and the serving step (an 8192-token
# prefill chunk over a cached prefix, paged, vs the contiguous API on the same shape).
OFF_GRID = [8191, 8193, 10000, 10001, 12287, 20000]
# Single timings at 8k-12k spread by ~10% from run to run (NOTES-prefill.md, session 21):
# each length's jaxattn and cuDNN take turns this many times, and the medians are compared.
OFF_GRID_ROUNDS = int(os.environ.get("OFF_GRID_ROUNDS", "3"))
RANDOM_LENGTHS = sorted(int(x) for x in np.random.default_rng(19).integers(4096, 131073, 8))


def _time_into(entry, name, flops, f, *args):
    """entry[name]: f's median ms and TFLOP/s over args, or the error that stopped it."""
    try:
        m = _measure(f, *args, target_ms=300.0)
        entry[name] = dict(m, tflops=flops / m["ms"] / 1e9)
    except Exception as e:  # noqa: BLE001 - record and go on
        entry[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=3)


def _rounds(fns: dict, args, rounds: int) -> dict[str, list[dict]]:
    """Each of ``fns`` measured (:func:`_measure`: median GPU ms, clocks) once a round for
    ``rounds`` rounds (:func:`benchmarks.common.gpu_rounds`: a shuffled order, then it
    reversed). ``args``: every callable's arguments, or a dict of each one's."""
    calls = {name: (f, args[name] if isinstance(args, dict) else args) for name, f in fns.items()}
    return gpu_rounds(calls, rounds,
                      measure=lambda f, *a: _measure(f, *a, target_ms=300.0))


def _summary(ratios):
    return dict(min=min(ratios), median=statistics.median(ratios), max=max(ratios), n=len(ratios))


def bench_off_grid(res):
    rows = res["off_grid"]
    # OFF_GRID_LENGTHS (comma-separated): causal lengths of their own instead of the sweep.
    only = [int(x) for x in os.environ.get("OFF_GRID_LENGTHS", "").split(",") if x]
    for mode, lengths in ((("causal", only),) if only else
                          (("causal", OFF_GRID + RANDOM_LENGTHS),
                           ("chunked", [8193, 10001] + RANDOM_LENGTHS[::2]))):
        for length in lengths:
            if time.time() - T0 > BUDGET_S:
                log("budget reached; skipping off-grid", mode, length)
                break
            chunked = mode == "chunked"
            flops = chunked_flops(length) if chunked else causal_flops(length, length)
            q, k, v = _inputs(length, jnp.bfloat16)
            entry = dict(mode=mode, length=length, flops=flops, random=length in RANDOM_LENGTHS)
            # cuDNN's chunked stand-in needs whole chunks: else whole chunks + the partial one.
            cudnn = (cudnn_chunked_ragged_fn(length) if chunked and length % CHUNK
                     else cudnn_fn(chunked))
            fns = {"jaxattn": jaxattn_fn(CHUNK if chunked else None), "cudnn": cudnn}
            try:
                times = _rounds(fns, (q, k, v), OFF_GRID_ROUNDS)
            except Exception as e:  # noqa: BLE001 - record and go on
                entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=3)
            else:
                for name, measured in times.items():
                    t = [m["ms"] for m in measured]
                    ms = statistics.median(t)
                    entry[name] = dict(ms=ms, tflops=flops / ms / 1e9, all_ms=t,
                                       spread=max(t) / min(t),
                                       clocks=[m.get("clocks") for m in measured])
                entry["ratio_vs_cudnn"] = entry["cudnn"]["ms"] / entry["jaxattn"]["ms"]
            rows.append(entry)
            log("off-grid", _fmt_row(entry))
            del q, k, v
    for mode in ("causal", "chunked"):
        ratios = [e["ratio_vs_cudnn"] for e in rows if e["mode"] == mode and "ratio_vs_cudnn" in e]
        rnd = [e["ratio_vs_cudnn"] for e in rows if e["mode"] == mode and e["random"]
               and "ratio_vs_cudnn" in e]
        if ratios:
            res["off_grid_summary"][mode] = dict(all=_summary(ratios),
                                                 random=_summary(rnd) if rnd else None)
    log("off-grid summary", res["off_grid_summary"])


# 8k-16k: where "auto" moves between tile orders at a few waves per head, and where single
# runs spread by ~10% (NOTES-prefill.md, v6): the worst random length (11720) and 12287 are here.
ORDER_LENGTHS = sorted([8191, 10000, 10001, 11720, 12287] + [
    int(x) for x in np.random.default_rng(23).integers(8193, 16384, 4)])


def _order_cases() -> list[tuple[str, int]]:
    """``ORDER_CASES`` ("mode:length,...", e.g. "chunked:32768,chunked:131072"), else causal
    :data:`ORDER_LENGTHS`. Chunked-local 128k ran at 512 TFLOP/s where causal 8k, the same
    items (8k-token chunks), ran at 580 (fp8-kv-2026-12-04-s29.md): "auto" takes kv_major
    for the one and item_major for the other, which this compares directly."""
    spec = os.environ.get("ORDER_CASES")
    if not spec:
        return [("causal", n) for n in ORDER_LENGTHS]
    return mode_lengths(spec)


def bench_orders(res, rounds=3):
    """Each tile order and cuDNN visited in turn ``rounds`` times in one run
    (``BENCH_PARTS=orders``) at :func:`_order_cases` (causal 8k-16k by default); per case
    the median ms of each, its spread (max / min over the rounds) and cuDNN's median / each
    order's (chunked-local: cuDNN's reshaped batch). All orders go through
    ``kernels.attention`` with an explicit config, so none pays the API's per-call plan."""
    orders = {name: prefill.PrefillConfig(tile_order=name)
              for name in ("auto", "kv_major", "item_major")}
    for mode, length in _order_cases():
        if time.time() - T0 > BUDGET_S:
            log("budget reached; skipping tile orders at", mode, length)
            break
        chunked = mode == "chunked"
        q, k, v = _inputs(length, jnp.bfloat16)
        fns = {name: jaxattn_fn(CHUNK if chunked else None, cfg) for name, cfg in orders.items()}
        fns["cudnn"] = (cudnn_chunked_ragged_fn(length) if chunked and length % CHUNK
                        else cudnn_fn(chunked))
        try:
            times = {name: [m["ms"] for m in measured]
                     for name, measured in _rounds(fns, (q, k, v), rounds).items()}
        except Exception as e:  # noqa: BLE001 - record and go on
            res["orders"].append(dict(mode=mode, length=length,
                                      error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        med = {name: statistics.median(t) for name, t in times.items()}
        flops = chunked_flops(length) if chunked else causal_flops(length, length)
        res["orders"].append(dict(
            mode=mode, length=length, ms=med, all_ms=times,
            spread={name: max(t) / min(t) for name, t in times.items()},
            tflops={name: flops / ms / 1e9 for name, ms in med.items()},
            ratio_vs_cudnn={name: med["cudnn"] / med[name] for name in orders}))
        log("orders", res["orders"][-1])
        del q, k, v


# (name, page size, shuffled?, merge_pages) of bench_paging's paged columns, beside the
# contiguous API. In order is how the engine hands out a prompt's pages (16: its default
# page, 32: the FP8 cache's); "per page": PrefillConfig(merge_pages=False).
PAGINGS = (("page 16, in order", 16, False, True),
           ("page 16, in order, per page", 16, False, False),
           ("page 32, in order", 32, False, True),
           ("page 32, shuffled", 32, True, True),
           ("page 128, shuffled", 128, True, True))


def bench_paging(res, rounds=3):
    """The same prefill through the contiguous API (one page per sequence: a TMA copy per KV
    tile) and over :data:`PAGINGS` pools, in turn ``rounds`` times in one run
    (``BENCH_PARTS=paging``), at ``PAGING_CASES`` ("mode:length,..."; default chunked 128k,
    causal 8k and 32k): what the page size, the page order and the merged copies of
    consecutive pages cost (benchmarks/NOTES-prefill.md, sessions 30-31)."""
    spec = os.environ.get("PAGING_CASES", "chunked:131072,causal:8192,causal:32768")
    for mode, length in mode_lengths(spec):
        if time.time() - T0 > BUDGET_S:
            log("budget reached; skipping paging at", mode, length)
            break
        chunk = CHUNK if mode == "chunked" else None
        q, k, v = _inputs(length, jnp.bfloat16)
        fns, args = {"contiguous": jaxattn_fn(chunk)}, {"contiguous": (q, k, v)}
        for name, page, shuffle, merge in PAGINGS:
            fns[name], args[name] = _paged_step_fn(q[0], k[0], v[0], page, chunk, shuffle,
                                                   merge_pages=merge)
        flops = chunked_flops(length) if chunk else causal_flops(length, length)
        try:
            times = {name: [m["ms"] for m in measured]
                     for name, measured in _rounds(fns, args, rounds).items()}
        except Exception as e:  # noqa: BLE001 - record and go on
            res["paging"].append(dict(mode=mode, length=length,
                                      error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        med = {name: statistics.median(t) for name, t in times.items()}
        res["paging"].append(dict(
            mode=mode, length=length, ms=med, all_ms=times,
            spread={name: max(t) / min(t) for name, t in times.items()},
            tflops={name: flops / ms / 1e9 for name, ms in med.items()}))
        log("paging", res["paging"][-1])
        del q, k, v, args


def cudnn_chunked_ragged_fn(length):
    """cuDNN for chunked-local attention at a length that is not whole chunks: the whole
    chunks as one batch plus the partial last chunk as a second call."""
    n_full = length // CHUNK * CHUNK

    def f(q, k, v):
        b = q.shape[0]
        head = [x[:, :n_full].reshape(b * n_full // CHUNK, CHUNK, *x.shape[2:]) for x in (q, k, v)]
        tail = [x[:, n_full:] for x in (q, k, v)]
        o1 = jax.nn.dot_product_attention(*head, is_causal=True, implementation="cudnn")
        o2 = jax.nn.dot_product_attention(*tail, is_causal=True, implementation="cudnn")
        return o1.reshape(b, n_full, *o1.shape[2:]), o2
    return jax.jit(f)


# (column, page size, shuffled?) of bench_serving_step's paged pools: the engine's default
# page in the order its allocator hands out a prompt's pages, the same shuffled (a pool
# after churn), and 128-token pages (one TMA copy per KV tile in any order).
SERVING_POOLS = (("paged_16_in_order", 16, False), ("paged_16", 16, True),
                 ("paged_128", 128, True))


def bench_serving_step(res, q_len=8192):
    """The serving step's prefill: one 8192-token chunk over a cached prefix of a random
    length, through ragged_paged_attention on the :data:`SERVING_POOLS` paged caches, next
    to the contiguous API on the same shape (bottom-right causal: the chunk's queries are
    the last 8192 of kv_len keys)."""
    rng = np.random.default_rng(20)
    kv_lens = [int(x) for x in rng.integers(q_len + 1, 131073, 4)] + [q_len + 4999]
    for chunk in (None, CHUNK):
        for kv_len in kv_lens:
            if time.time() - T0 > BUDGET_S:
                return
            flops = _bottom_right_flops(q_len, kv_len, chunk)
            kq, kk, kv = jax.random.split(jax.random.key(kv_len), 3)
            q = jax.random.normal(kq, (1, q_len, HQ, D), jnp.bfloat16)
            k = jax.random.normal(kk, (1, kv_len, HKV, D), jnp.bfloat16)
            v = jax.random.normal(kv, (1, kv_len, HKV, D), jnp.bfloat16)
            entry = dict(q_len=q_len, kv_len=kv_len, chunk=chunk, flops=flops)
            _time_into(entry, "contiguous", flops, jaxattn_fn(chunk), q, k, v)
            for name, page, shuffle in SERVING_POOLS:
                f, args = _paged_step_fn(q[0], k[0], v[0], page, chunk, shuffle)
                _time_into(entry, name, flops, f, *args)
                del args
            res["serving_step"].append(entry)
            log("serving step", {k2: (v2.get("tflops") if isinstance(v2, dict) else v2)
                                 for k2, v2 in entry.items()})
            del q, k, v


def _bottom_right_flops(q_len, kv_len, chunk):
    pos = np.arange(kv_len - q_len, kv_len)
    lo = (pos // chunk) * chunk if chunk else np.zeros_like(pos)
    return 4 * HQ * D * float((pos - lo + 1).sum())


def _paged_step_fn(q, k, v, page, chunk, shuffle=True, merge_pages=True):
    """ragged_paged_attention over ``k``/``v`` cut into pages of ``page`` tokens, placed in
    the pool in a random order (``shuffle``) or in sequence order. ``merge_pages=False``:
    compiled with the prefill kernel copying a KV tile page by page even when its pages
    are consecutive."""
    kv_len = k.shape[0]
    n_pages = -(-kv_len // page)
    max_len = n_pages * page
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=q.shape[0],
                            max_model_len=max_len, page_size=page, num_q_heads=HQ,
                            num_kv_heads=HKV, head_dim=D, chunk_size=chunk,
                            num_workers=kernels.num_sms())
    pad = ((0, max_len - kv_len), (0, 0), (0, 0))
    perm = (np.random.default_rng(page).permutation(n_pages) if shuffle
            else np.arange(n_pages))
    kp = jnp.pad(k, pad).reshape(n_pages, page, HKV, D)[np.argsort(perm)]
    vp = jnp.pad(v, pad).reshape(n_pages, page, HKV, D)[np.argsort(perm)]
    table = perm.astype(np.int32)[None]  # logical page i lives at physical perm[i]
    cu = np.array([0, q.shape[0]], np.int32)
    f = jax.jit(functools.partial(jaxattn.ragged_paged_attention, bounds=bounds,
                                  chunk_size=chunk, impl="mosaic"))
    args = (q, kp, vp, table, cu, np.array([kv_len], np.int32), np.int32(1))
    if not merge_pages:  # traced now, while the picker turns the merge off
        pick = prefill.pick_config
        with mock.patch.object(prefill, "pick_config",
                               lambda *a, **kw: pick(*a, **kw, merge_pages=False)):
            f = f.lower(*args).compile()
    return f, args


def bench_variants(rows):
    """Kernel knobs at fixed shapes, same run: tile order (GQA / L2 sharing), block_kv and
    stages, intra-warpgroup overlap. Each variant's output is compared with the default's."""
    variants = {
        "auto (default)": prefill.PrefillConfig(),
        "kv_major": prefill.PrefillConfig(tile_order="kv_major"),
        "item_major": prefill.PrefillConfig(tile_order="item_major"),
        "no_overlap": prefill.PrefillConfig(overlap=False),
        "mbarrier_turns": prefill.PrefillConfig(named_barriers=False),
        "bkv64_s4": prefill.PrefillConfig(block_kv=64, num_stages=4),
    }
    shapes = os.environ.get("BENCH_VARIANT_SHAPES", "causal:32768,chunked:131072,causal:131072")
    for mode, length in ((m, int(x)) for m, x in (p.split(":") for p in shapes.split(",") if p)):
        if length not in LENGTHS or time.time() - T0 > BUDGET_S:
            continue
        chunked = mode == "chunked"
        flops = chunked_flops(length) if chunked else causal_flops(length, length)
        q, k, v = _inputs(length, jnp.bfloat16)
        base = None
        for name, cfg in variants.items():
            if mode == "causal" and length == 131072 and name == "bkv64_s4":
                continue
            try:
                f = jaxattn_fn(CHUNK if chunked else None, cfg)
                m = _measure(f, q, k, v)
                out = f(q, k, v)
                base = out if base is None else base
                rows.append(dict(mode=mode, length=length, variant=name, **m,
                                 tflops=flops / m["ms"] / 1e9,
                                 max_abs_diff_vs_default=_max_err(out, base)))
                del out
            except Exception as e:  # noqa: BLE001
                rows.append(dict(mode=mode, length=length, variant=name,
                                 error=f"{type(e).__name__}: {str(e)[:300]}"))
            log(rows[-1])
        del q, k, v, base


def bench_varlen(rows):
    """Packed mixed lengths vs one sequence of the same causal work, same compiled function."""
    total = 65536
    lens = [16384, 8192, 8192] + [4096] * 4 + [2048] * 4 + [1024] * 8
    assert sum(lens) == total
    work = sum(causal_flops(x, x) for x in lens)
    single = int(round(np.sqrt(sum(x * x for x in lens)) / 128)) * 128
    page = 64
    bounds = jaxattn.Bounds(max_num_seqs=32, max_num_batched_tokens=total, max_model_len=total,
                            page_size=page, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            num_workers=kernels.num_sms())
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    n_pages = total // page + 32
    q = jax.random.normal(kq, (total, HQ, D), jnp.bfloat16)
    kp = jax.random.normal(kk, (n_pages, page, HKV, D), jnp.bfloat16)
    vp = jax.random.normal(kv, (n_pages, page, HKV, D), jnp.bfloat16)
    f = jax.jit(functools.partial(jaxattn.ragged_paged_attention, bounds=bounds, impl="mosaic"))

    def batch(seq_lens):
        cu = np.zeros(33, np.int32)
        cu[1:len(seq_lens) + 1] = np.cumsum(seq_lens)
        cu[len(seq_lens) + 1:] = cu[len(seq_lens)]
        kvl = np.zeros(32, np.int32)
        kvl[:len(seq_lens)] = seq_lens
        table = np.zeros((32, bounds.pages_per_seq), np.int32)
        perm = np.random.default_rng(0).permutation(n_pages)
        off = 0
        for s, x in enumerate(seq_lens):
            u = -(-x // page)
            table[s, :u] = perm[off:off + u]
            off += u
        return table, cu, kvl, np.int32(len(seq_lens))

    for name, seq_lens, flops in (("packed_mixed", lens, work),
                                  ("one_sequence", [single], causal_flops(single, single))):
        table, cu, kvl, n = batch(seq_lens)
        m = _measure(f, q, kp, vp, table, cu, kvl, n)
        rows.append(dict(mode="varlen", variant=name, lengths=seq_lens, **m, flops=flops,
                         tflops=flops / m["ms"] / 1e9))
        log(rows[-1])


def bench_sustained(rows, length=32768):
    """Back-to-back calls for SUSTAIN_S seconds each, jaxattn and cuDNN alternating twice:
    wall ms per call (planner included) next to the SM clock and power while it ran."""
    if length not in LENGTHS or time.time() - T0 > BUDGET_S:
        return
    q, k, v = _inputs(length, jnp.bfloat16)
    fns = {"jaxattn": jaxattn_fn(None), "cudnn": cudnn_fn(False)}
    for f in fns.values():
        jax.block_until_ready(f(q, k, v))
    for phase in range(2):
        for name, f in fns.items():
            time.sleep(3)  # let the clock recover between phases
            t0, n = time.time(), 0
            while time.time() - t0 < SUSTAIN_S:
                jax.block_until_ready([f(q, k, v) for _ in range(10)])
                n += 10
            t1 = time.time()
            rows.append(dict(mode="causal", length=length, impl=name, phase=phase, calls=n,
                             wall_ms=(t1 - t0) / n * 1e3,
                             tflops=causal_flops(length, length) / ((t1 - t0) / n * 1e3) / 1e9,
                             clocks=_clocks(t0 + 1.0, t1)))  # skip the ramp-up second
            log(rows[-1])
    del q, k, v


def _fmt_row(e):
    def cell(name):
        x = e.get(name, {})
        return f"{x['ms']:.3f} ms {x['tflops']:.0f}" if "ms" in x else ("err" if x else "-")
    return (f"{e['mode']:8s} {e['length']:>7d} | jaxattn {cell('jaxattn'):>20s} | cudnn "
            f"{cell('cudnn'):>20s} | mgpu16 {cell('mgpu_fp16'):>20s} | ratio "
            f"{e.get('ratio_vs_cudnn', float('nan')):.3f}")


def markdown(res):
    lines = [f"# Prefill benchmark {res['date']}", "", f"Device: {res['device']}; jax {res['jax']}.",
             "GPU ms from CUPTI (median); TFLOP/s = 4*L*L*Hq*D/t, causal halved, chunked useful only.",
             "", "| mode | length | jaxattn ms | TFLOP/s | cuDNN ms | TFLOP/s | ratio (cuDNN/jaxattn) "
             "| mgpu fp16 ms | TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for e in res["lengths"]:
        def c(name, key):
            x = e.get(name, {})
            return f"{x[key]:.3f}" if key == "ms" and key in x else (f"{x[key]:.0f}" if key in x else "-")
        lines.append(f"| {e['mode']} | {e['length']} | {c('jaxattn', 'ms')} | {c('jaxattn', 'tflops')} "
                     f"| {c('cudnn', 'ms')} | {c('cudnn', 'tflops')} | "
                     f"{e.get('ratio_vs_cudnn', float('nan')):.3f} | {c('mgpu_fp16', 'ms')} "
                     f"| {c('mgpu_fp16', 'tflops')} |")
    if res.get("off_grid"):
        rounds = len(res["off_grid"][0].get("jaxattn", {}).get("all_ms", [None]))
        lines += ["", "Lengths that are not multiples of anything (fixed boundaries, then random "
                  f"lengths, seed 19), jaxattn and cuDNN in turn {rounds} times: cuDNN ms / "
                  "jaxattn ms of the medians; spread = max / min of a length's rounds", "",
                  "| mode | length | random | jaxattn ms | TFLOP/s | cuDNN ms | TFLOP/s | ratio "
                  "| spread jaxattn / cuDNN |",
                  "|---|---|---|---|---|---|---|---|---|"]
        nan = float("nan")
        for e in res["off_grid"]:
            j, c = e.get("jaxattn", {}), e.get("cudnn", {})
            lines.append(f"| {e['mode']} | {e['length']} | {'yes' if e['random'] else ''} | "
                         f"{j.get('ms', nan):.3f} | {j.get('tflops', nan):.0f} | "
                         f"{c.get('ms', nan):.3f} | {c.get('tflops', nan):.0f} | "
                         f"{e.get('ratio_vs_cudnn', nan):.3f} | "
                         f"{j.get('spread', nan):.3f} / {c.get('spread', nan):.3f} |")
        for mode, sm in res.get("off_grid_summary", {}).items():
            for which, x in sm.items():
                if x:
                    lines.append(f"\n{mode}, {which} lengths ({x['n']}): ratio min {x['min']:.3f}, "
                                 f"median {x['median']:.3f}, max {x['max']:.3f}")
    if res.get("orders"):
        names = list(dict.fromkeys(n for e in res["orders"] for n in e.get("ratio_vs_cudnn", {})))
        # Columns from the results (session 54's runs also timed PrefillConfig.chunk_groups).
        lines += ["", "Tile orders (and other forms), each visited in turn 3 times in one "
                  "run: cuDNN ms / its ms (medians; chunked: cuDNN's reshaped batch), "
                  "jaxattn's TFLOP/s in the same column order, and the largest max/min "
                  "spread of any of them", "",
                  "| case | " + " | ".join(names) + " | TFLOP/s | cuDNN ms | worst spread |",
                  "|---|" + "---|" * (len(names) + 3)]
        for e in res["orders"]:
            case = f"{e.get('mode', 'causal')} {e['length']}"
            if "error" in e:
                lines.append(f"| {case} | error: {e['error'][:80]} |")
                continue
            r, t = e["ratio_vs_cudnn"], e.get("tflops", {})
            cells = " | ".join(f"{r[n]:.3f}" if n in r else "-" for n in names)
            rates = " / ".join(f"{t[n]:.0f}" if n in t else "-" for n in names)
            lines.append(f"| {case} | {cells} | {rates} | {e['ms']['cudnn']:.3f} | "
                         f"{max(e['spread'].values()):.3f} |")
    if res.get("paging"):
        names = ["contiguous"] + [name for name, *_ in PAGINGS]
        lines += ["", "Paging, each column in turn 3 times in one run: median ms (useful "
                  "TFLOP/s, time / contiguous) and the largest max/min spread of any of them", "",
                  "| case | " + " | ".join(names) + " | worst spread |",
                  "|---|" + "---|" * (len(names) + 1)]
        for e in res["paging"]:
            case = f"{e['mode']} {e['length']}"
            if "error" in e:
                lines.append(f"| {case} | error: {e['error'][:80]} |")
                continue
            ms, t = e["ms"], e["tflops"]
            lines.append(f"| {case} | " + " | ".join(
                f"{ms[n]:.3f} ({t[n]:.0f}, {ms[n] / ms['contiguous']:.3f})" for n in names)
                + f" | {max(e['spread'].values()):.3f} |")
    if res.get("serving_step"):
        lines += ["", "Serving step: one 8192-token prefill chunk over kv_len keys, "
                  "TFLOP/s (useful FLOPs)", "",
                  "| chunk | kv_len | contiguous API | page 16, in order | page 16, shuffled "
                  "| page 128, shuffled |", "|---|---|---|---|---|---|"]
        for e in res["serving_step"]:
            t = [f"{e.get(k, {}).get('tflops', float('nan')):.0f}"
                 for k in ("contiguous", *(name for name, *_ in SERVING_POOLS))]
            lines.append(f"| {e['chunk'] or '-'} | {e['kv_len']} | {' | '.join(t)} |")
    lines += ["", "SM clock (median MHz, nvidia-smi) while each implementation's repetitions ran "
              "(- where they were too short for a sample):", "",
              "| mode | length | jaxattn MHz | cuDNN MHz |", "|---|---|---|---|"]
    for e in res["lengths"]:
        mhz = [(e.get(n, {}).get("clocks") or {}).get("sm_mhz_median", "-") for n in ("jaxattn", "cudnn")]
        if mhz != ["-", "-"]:
            lines.append(f"| {e['mode']} | {e['length']} | {mhz[0]} | {mhz[1]} |")
    if res["sustained"]:
        lines += ["", f"Sustained load ({SUSTAIN_S:.0f} s per phase, wall clock per call):", "",
                  "| impl | phase | ms/call | TFLOP/s | SM MHz median (min) | power W (limit) "
                  "| clock events |", "|---|---|---|---|---|---|---|"]
        for e in res["sustained"]:
            c = e["clocks"] or {}
            lines.append(f"| {e['impl']} | {e['phase']} | {e['wall_ms']:.2f} | {e['tflops']:.0f} | "
                         f"{c.get('sm_mhz_median', '-')} ({c.get('sm_mhz_min', '-')}) | "
                         f"{c.get('power_w_median', '-')} ({c.get('power_limit_w', '-')}) | "
                         f"{', '.join(c.get('clock_events', [])) or '-'} |")
    lines += ["", "| variant | mode | length | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for e in res["variants"] + res["varlen"]:
        lines.append(f"| {e.get('variant')} | {e['mode']} | {e.get('length', sum(e.get('lengths', [])))} "
                     f"| {e.get('ms', float('nan')):.3f} | {e.get('tflops', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    if not res["lengths"]:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("causal", "chunked")):
        es = [e for e in res["lengths"] if e["mode"] == mode]
        for name in ("jaxattn", "cudnn", "mgpu_fp16"):
            pts = [(e["length"], e[name]["tflops"]) for e in es if "tflops" in e.get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} (40/8 heads, D=128)")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    time_kernels_alone()
    dev = jax.devices()[0]
    log("device:", dev, getattr(dev, "core_count", None))
    res = dict(date=datetime.date.today().isoformat(), device=str(dev.device_kind), jax=jax.__version__,
               heads=[HQ, HKV], head_dim=D, chunk=CHUNK, lengths=[], variants=[], varlen=[],
               sustained=[], off_grid=[], off_grid_summary={}, serving_step=[], orders=[],
               paging=[])
    RESULTS.mkdir(parents=True, exist_ok=True)
    # BENCH_TAG: a suffix, so that a second run on one day does not overwrite the first.
    stem = RESULTS / f"prefill-{res['date']}{os.environ.get('BENCH_TAG', '')}"
    global CLOCKS
    CLOCKS = GpuClockLog(f"/tmp/prefill-{os.getpid()}-nvidia-smi.csv")
    try:
        parts = os.environ.get("BENCH_PARTS", "lengths,off_grid,serving_step,varlen,sustained,"
                               "variants").split(",")
        for part, fn in (("lengths", bench_lengths), ("off_grid", bench_off_grid),
                         ("serving_step", bench_serving_step), ("varlen", bench_varlen),
                         ("sustained", bench_sustained), ("variants", bench_variants),
                         ("orders", bench_orders), ("paging", bench_paging)):
            if part not in parts:
                continue
            try:
                fn(res if part in ("off_grid", "serving_step", "orders", "paging")
                   else res[part])
            except Exception:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
    finally:
        CLOCKS.close()
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    log(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
