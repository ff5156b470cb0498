"""Decode attention bandwidth: jaxattn's paged split-KV kernel vs cuDNN and XLA, one GPU run.

    python -m benchmarks.decode            # on the GPU (benchmarks/gpu.sh decode)
    python -m benchmarks.decode --plot benchmarks/results/decode-<date>.json   # redraw

Effective bandwidth = bytes of K and V read / time (one new token per
sequence, Scout's 40 query / 8 KV heads, D=128, bf16). cuDNN and XLA run on a
contiguous cache through ``jax.nn.dot_product_attention`` (no ``is_causal``:
its causal mask is top-left; ``key_value_seq_lengths`` instead), all of them taking
turns batch by batch (:func:`interleaved`). The HBM
ceiling is measured in the same run. A second table compares page sizes and
kernel tunings at the same sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from benchmarks.common import gpu_ms, gpu_rounds, time_kernels_alone, trace_summary
from benchmarks.roofline import read_bandwidth
from jaxattn import planner
from jaxattn.kernels import common, decode, decode_combine, decode_schedule

HQ, HKV, D = 40, 8, 128
DTYPE = jnp.bfloat16
CASES = [(256, 2048), (32, 8192), (8, 32768), (1, 131072)]  # (batch, context)
# (page size, block_kv, stages): the page size / tuning comparison.
VARIANTS = [(16, 64, 4), (32, 64, 4), (64, 64, 4), (16, 128, 2)]
VARIANT_CASES = [(32, 8192), (1, 131072)]
RESULTS = pathlib.Path(__file__).parent / "results"


def timeit(fn, *args, n=20, reps=5):
    """Median seconds per call over ``reps`` batches of ``n`` back-to-back calls."""
    return interleaved({"fn": lambda: fn(*args)}, n=n, reps=reps)["fn"]


def interleaved(fns: dict, n=20, reps=7):
    """Median seconds per call of each of ``fns`` (name -> no-argument callable), by wall
    time, the callables taking turns batch by batch (``n`` back-to-back calls each) in
    :func:`benchmarks.common.gpu_rounds`' rounds (a shuffled order, then it reversed), so a
    drift in the GPU's clocks reaches all of them alike and no callable keeps one neighbour."""
    for fn in fns.values():
        jax.block_until_ready(fn())

    def batch(fn):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n

    times = gpu_rounds({name: (fn, ()) for name, fn in fns.items()}, reps, measure=batch)
    return {name: statistics.median(t) for name, t in times.items()}


def ceilings():
    """Same-run HBM ceilings: copy (read + write of 2 GiB) and read-only (sum of 2 GiB), by
    wall time; and the decode kernel's read form alone (:func:`ring_tbps`), by GPU time."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    nbytes = x.size * x.dtype.itemsize
    copy = timeit(jax.jit(lambda x: x + 1), x, n=10)
    del x
    return {"copy_tbps": 2 * nbytes / copy / 1e12, "read_tbps": read_bandwidth(nbytes) / 1e12,
            "ring_tbps": ring_tbps()}


def ring_tbps(keys: int = 32 * 8192) -> float:
    """TB/s of :mod:`benchmarks.read_ceiling`'s default form (the main kernel's TMA ring with
    nothing but the reads: 128-key blocks of K and V, 2 deep, one CTA a tile) over ``keys``
    keys' K and V, by GPU time: what the main kernel's reads allow. On one H100 it read
    3.14-3.16 TB/s where the XLA sum of the read-only ceiling gave 2.97-3.04 (by wall time)
    and cuDNN's decode kernel ~3.05 (benchmarks/NOTES-decode.md, session 59)."""
    from benchmarks import read_ceiling

    k, v = (jnp.zeros((keys, HKV, D), DTYPE) + i for i in range(2))  # two buffers: no L2 reuse
    ring = jax.jit(lambda k, v: read_ceiling.stream(k, v, read_ceiling.StreamConfig()))
    return 2 * k.nbytes / (gpu_ms(ring, k, v) * 1e-3) / 1e12


def kv_bytes(batch, ctx):
    return 2 * batch * ctx * HKV * D * jnp.dtype(DTYPE).itemsize


def contiguous(batch, ctx, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, 1, HQ, D), DTYPE)
    k = jax.random.normal(keys[1], (batch, ctx, HKV, D), DTYPE)
    v = jax.random.normal(keys[2], (batch, ctx, HKV, D), DTYPE)
    return q, k, v


# Where a pool's pages sit (--page-order): "pages", each page anywhere (a long-churned pool in
# least-recently-freed order, the engine's before session 55); "blocks", each kernel block's
# pages one after another, the blocks anywhere (the engine's since: serve.block_manager keeps
# a block in a wholly free group of pages); "in-order", a sequence's pages one after another
# (a fresh pool's).
PAGE_ORDERS = ("pages", "blocks", "in-order")


def paged(k, v, page_size, seed=0, order="pages"):
    """The contiguous cache cut into pages, placed in the pool as ``order`` says
    (:data:`PAGE_ORDERS`; a block is ``bounds_for``'s ``block_kv`` keys); page table per
    sequence. A sequence's pages are padded up to whole blocks under "blocks"."""
    if order not in PAGE_ORDERS:
        raise ValueError(f"order={order!r}: one of {PAGE_ORDERS}")
    batch, ctx = k.shape[:2]
    run = max(1, bounds_for(batch, page_size).block_kv // page_size) if order == "blocks" else 1
    per_seq = -(-ctx // (page_size * run)) * run
    n = batch * per_seq
    rng = np.random.default_rng(seed)
    if order == "in-order":
        perm = np.arange(n)
    else:  # whole runs of `run` pages in random places (run 1: single pages)
        perm = (rng.permutation(n // run)[:, None] * run + np.arange(run)).ravel()
    inv = np.argsort(perm).astype(np.int32)  # logical page i lives at pool slot inv[i]

    def pool(x):
        x = jnp.pad(x, ((0, 0), (0, per_seq * page_size - ctx), (0, 0), (0, 0)))
        return x.reshape(n, page_size, HKV, D)[perm]

    return pool(k), pool(v), jnp.asarray(inv.reshape(batch, per_seq))


def bounds_for(batch, page_size):
    return jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=256, max_model_len=131072,
                          page_size=page_size, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          chunk_size=8192, block_kv=max(128, page_size),
                          num_workers=common.num_sms(),
                          min_split_kv=512)


# Other forms timed beside the default in the same run: (key, column title, config change).
# The combine folded into the main kernel (session 57; off by default, slower at batch 1), and
# the combine kernel with one warpgroup: since session 56 that takes a 16-piece parent's pieces
# in one batch (32 one-token slots), where two warpgroups each take 8 and then hand one state
# over. (Session 57's runs had the fold as the default and the combine kernel as a column.)
OTHERS = [("jaxattn_fold", "combine folded into the main kernel", {"fold_combine": True}),
          ("jaxattn_combine_wg1", "combine kernel, one warpgroup",
           {"combine": decode_combine.CombineConfig(warpgroups=1)})]
# ... and over pools whose blocks' pages are in order (--page-order blocks or in-order), where
# it changes something: each page its own copy, as before DecodeConfig.merge_pages became the
# default (session 55).
IN_ORDER_OTHERS = [("jaxattn_page_by_page", "page by page (merge_pages off)",
                    {"merge_pages": False})]
# Columns of earlier runs' JSON (--plot): 64-key blocks, the default before session 17; round
# robin, beside the balanced schedule as the default in session 18's run; the balanced
# (stream-K) and last-round schedules, measured slower in sessions 18-19 and removed
# (benchmarks/NOTES-decode.md, v10-v11); the combine's one copy per piece, a column in session
# 20 and the only form since; L2 prefetches of the block 1 or 2 steps ahead beside each
# block's copies (DecodeConfig.l2_ahead): 0.2-1.5% and 2.6-3.8% slower (session 53), removed;
# consecutive pages in one copy, a column in session 55 and the default since; the combine
# as in session 18 (one warpgroup, exact exp), a column until session 57.
_OLD_COLUMNS = [("jaxattn_bk64", "64-key blocks (before)"),
                ("jaxattn_rr", "round-robin tiles (before)"),
                ("jaxattn_balanced", "balanced schedule"),
                ("jaxattn_last_round", "balanced last round"),
                ("jaxattn_unsplit", "balanced, planner does not split"),
                ("jaxattn_combine_one_copy", "combine, one copy per piece"),
                *((f"jaxattn_l2_ahead{n}", f"L2 prefetch {n} block{'s' * (n > 1)} ahead")
                  for n in (1, 2)),
                ("jaxattn_merged", "pages merged"),
                ("jaxattn_combine_s18",
                 "combine as in session 18 (one copy per piece since s21)"),
                ("jaxattn_combine_kernel", "combine kernel (fold_combine off)")]


def jaxattn_fns(batch, ctx, q, k_pages, v_pages, table, page_size, config):
    """Timed callables: per-layer attention (given the step's plan), the main kernel alone,
    the kernel metadata alone, the plan; and the number of work items."""
    bounds = bounds_for(batch, page_size)
    cu = np.zeros(257, np.int32)
    cu[1:batch + 1] = np.arange(1, batch + 1)
    cu[batch + 1:] = batch
    kv_lens = np.zeros(256, np.int32)
    kv_lens[:batch] = ctx
    table = jnp.pad(table, ((0, 256 - batch), (0, bounds.pages_per_seq - table.shape[1])))
    plan_fn = jax.jit(lambda cu, kv, n: planner.plan(bounds, cu, kv, n))
    plan = plan_fn(cu, kv_lens, np.int32(batch))
    meta_fn = jax.jit(lambda items: decode_schedule.decode_metadata(items, bounds=bounds,
                                                                    num_tokens=256))
    md = meta_fn(plan.decode)
    qt = jnp.pad(q.reshape(batch, HQ, D), ((0, 256 - batch), (0, 0), (0, 0)))
    # As the model calls it: the metadata comes with the step's plan (one per step, shared
    # by every layer of a kind), so a layer's time excludes it; it is timed on its own.
    # The model keeps the output in q's dtype and drops the lse (kernels._run_plan), so XLA
    # never computes the lse gather; the layer here does the same.
    layer = jax.jit(lambda q, k, v, t, items, md: decode.decode_attention(
        q, k, v, t, items, bounds=bounds, scale=D ** -0.5, config=config,
        metadata=md)[0])

    def main_only(q, k, v, t, md):
        out_ref, lse_tiles, pieces, lse_merged = decode.main_kernel(
            q, k, v, t, md, bounds=bounds, scale=D ** -0.5, config=config)
        return out_ref[...], lse_tiles, pieces, lse_merged

    main_only = jax.jit(main_only)
    args = (qt, k_pages, v_pages, table)
    return (lambda: layer(*args, plan.decode, md), lambda: main_only(*args, md),
            lambda: meta_fn(plan.decode), lambda: plan_fn(cu, kv_lens, np.int32(batch)),
            int(plan.decode.count))


def dpa(impl):
    def fn(q, k, v, lens):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens,
                                            implementation=impl)
    return jax.jit(fn)


def run_case(batch, ctx, ceiling, profile=False, page_size=16, order="pages"):
    """One batch x context over pages of ``page_size`` placed as ``order`` says
    (:data:`PAGE_ORDERS`): jaxattn's layer, its parts, the other forms and cuDNN / XLA,
    interleaved; a row of the results."""
    row = {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes(batch, ctx), "page_size": page_size,
           "page_order": order}
    q, k, v = contiguous(batch, ctx)
    lens = jnp.full((batch,), ctx, jnp.int32)
    fns, ref = {}, None
    for impl in ("cudnn", "xla"):
        try:
            fn = dpa(impl)
            out = fn(q, k, v, lens)
            if impl == "cudnn":
                ref = np.asarray(out, np.float32).reshape(batch, HQ, D)
            fns[impl] = functools.partial(fn, q, k, v, lens)
        except Exception as e:  # e.g. XLA out of memory at large batch x context
            row[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    kp, vp, table = paged(k, v, page_size, order=order)
    config = decode.default_config()
    # (pages as large as a block are one copy each already)
    in_runs = order != "pages" and page_size < config.block_kv
    others = OTHERS + (IN_ORDER_OTHERS if in_runs else [])
    fns["jaxattn"], fns["kernel"], fns["meta"], fns["plan"], row["pieces"] = jaxattn_fns(
        batch, ctx, q, kp, vp, table, page_size, config)
    for key, _, change in others:
        fns[key], *_ = jaxattn_fns(batch, ctx, q, kp, vp, table, page_size,
                                   dataclasses.replace(config, **change))
    for name, sec in interleaved(fns).items():
        row[f"{name}_ms"] = sec * 1e3
    if profile:
        # GPU time alone (profiler): a call's wall time also holds its launches, ~20-40 us
        # here, which inside a model's step (one executable, CUDA graphs) mostly vanish. The
        # union of the kernels' spans, not their sum: under --dependent-launch the combine
        # starts before the main kernel ends and waits on the GPU (without it the two agree).
        for name in ("jaxattn", "cudnn", *(key for key, *_ in others)):
            if name in fns:
                trace = trace_summary(fns[name], reps=5, top=8)
                row[f"{name}_device_ms"] = trace["timeline"]["busy_ms"]
                row[f"{name}_kernel_sum_ms"] = trace["kernel_ms"]
                row[f"{name}_kernels"] = trace["kernels"]
    if ref is not None:
        out = np.asarray(fns["jaxattn"]()[:batch], np.float32)
        row["max_abs_err_vs_cudnn"] = float(np.abs(out - ref).max())
    for name in ("jaxattn", "kernel", "cudnn", "xla", *(key for key, *_ in others)):
        if f"{name}_ms" in row:
            row[f"{name}_tbps"] = row["kv_bytes"] / row[f"{name}_ms"] / 1e9
    row["jaxattn_frac_of_copy"] = row["jaxattn_tbps"] / ceiling["copy_tbps"]
    row["jaxattn_frac_of_read"] = row["jaxattn_tbps"] / ceiling["read_tbps"]
    if "cudnn_tbps" in row:
        for name in ("jaxattn", *(key for key, *_ in others)):
            row[f"{name}_vs_cudnn"] = row[f"{name}_tbps"] / row["cudnn_tbps"]
    return row


def run_variant(batch, ctx, page_size, block_kv, stages):
    q, k, v = contiguous(batch, ctx, seed=1)
    kp, vp, table = paged(k, v, page_size)
    del k, v
    config = decode.DecodeConfig(block_kv=block_kv, num_stages=stages, p_in_registers=True)
    full, main, _, _, _ = jaxattn_fns(batch, ctx, q, kp, vp, table, page_size, config)
    # Two interleaved measurements per variant: their spread is the noise floor.
    ms = [timeit(main) * 1e3 for _ in range(2)]
    return {"batch": batch, "ctx": ctx, "page_size": page_size, "block_kv": block_kv,
            "stages": stages, "kernel_ms": min(ms), "kernel_ms_runs": ms,
            "kernel_tbps": kv_bytes(batch, ctx) / min(ms) / 1e9}


def table_md(res):
    c = res["ceilings"]
    titles = [(key, title) for key, title, *_ in OTHERS + IN_ORDER_OTHERS] + _OLD_COLUMNS
    others = [(k, title) for k, title in titles if any(f"{k}_ms" in r for r in res["cases"])]
    lines = [f"# Decode bandwidth, {res['device']}, {res['date']}", "",
             f"Same-run ceilings: copy {c['copy_tbps']:.2f} TB/s, read-only {c['read_tbps']:.2f} TB/s"
             + (f"; the main kernel's TMA ring alone (benchmarks.read_ceiling, GPU time)"
                f" {c['ring_tbps']:.2f} TB/s." if "ring_tbps" in c else "."),
             "Bandwidth = bytes of K+V read / time. jaxattn = one layer's attention as the model"
             " calls it: the main kernel + the combine kernel (2026-12-07 session 57's runs: the"
             " main kernel merging split parents itself; + an XLA memset of the output before"
             " 2026-12-02 session 18's kernel zeroed the rows it does not cover; + the cast"
             " to q's dtype before 2026-12-01 session 11's kernels wrote that dtype themselves; the"
             " lse, which the model drops, is not computed; runs before 2026-12-01 session 7"
             " included its gather); the kernel"
             " metadata and the step's plan (built once per step, shared by all layers) are"
             " timed separately.", "",
             "| batch x ctx | pieces | jaxattn ms | TB/s | % copy | % read-only |"
             " main kernel TB/s | cuDNN TB/s | XLA TB/s | jaxattn / cuDNN |"
             + "".join(f" {title}: ms, / cuDNN |" for _, title in others)
             + " metadata ms | plan ms |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|---|"]
    f = lambda r, k: f"{r[k]:.3g}" if k in r else "—"
    for r in res["cases"]:
        if "error" in r:
            lines.append(f"| {r['batch']}x{r['ctx']} | error: {r['error'][:80]} |")
            continue
        of_read = (f"{100 * r['jaxattn_frac_of_read']:.0f}%" if "jaxattn_frac_of_read" in r
                   else "—")  # runs before 2026-12-01 session 11 lack it
        lines.append(f"| {r['batch']}x{r['ctx']} | {r['pieces']} | {r['jaxattn_ms']:.3f} | "
                     f"{r['jaxattn_tbps']:.2f} | {100 * r['jaxattn_frac_of_copy']:.0f}% | "
                     f"{of_read} | {f(r, 'kernel_tbps')} | {f(r, 'cudnn_tbps')} | "
                     f"{f(r, 'xla_tbps')} | "
                     f"{f(r, 'jaxattn_vs_cudnn')} | "
                     + "".join(f"{f(r, k + '_ms')}, {f(r, k + '_vs_cudnn')} | "
                               for k, _ in others) +
                     f"{f(r, 'meta_ms')} | {r['plan_ms']:.3f} |")
    profiled = [r for r in res["cases"] if "jaxattn_device_ms" in r]
    if profiled:
        lines += ["", "GPU time alone (profiler; the wall times above also hold each call's"
                  " launches), µs per call:", "",
                  "| batch x ctx | jaxattn | cuDNN | jaxattn / cuDNN | jaxattn, cuDNN: % of the"
                  " TMA ring's TB/s |"
                  + "".join(f" {title} |" for _, title in others) + " jaxattn's kernels |",
                  "|---|---|---|---|---|" + "---|" * len(others) + "---|"]
        ring = c.get("ring_tbps")  # runs before session 59 lack it
        for r in profiled:
            mine, theirs = (1e3 * r.get(k, float("nan")) for k in (
                "jaxattn_device_ms", "cudnn_device_ms"))
            of_ring = ("—" if not ring else ", ".join(
                f"{100 * r['kv_bytes'] / (us * 1e-6) / 1e12 / ring:.1f}%" for us in (mine, theirs)))
            lines.append(
                f"| {r['batch']}x{r['ctx']} | {mine:.1f} | {theirs:.1f} | "
                f"{theirs / mine if mine else float('nan'):.3f} | {of_ring} | "
                + "".join(f"{1e3 * r.get(k + '_device_ms', float('nan')):.1f} | "
                          for k, _ in others) + ", ".join(
                    f"{k['name'][:40]} {1e3 * k['ms']:.1f}" for k in r["jaxattn_kernels"]) + " |")
    lines += ["", "Page size / tuning (kernel only):", "",
              "| batch x ctx | page | block_kv x stages | TB/s (best of 2) | ms, both runs |",
              "|---|---|---|---|---|"]
    for r in res["variants"]:
        if "error" in r:
            lines.append(f"| {r['batch']}x{r['ctx']} | {r['page_size']} | "
                         f"error: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['batch']}x{r['ctx']} | {r['page_size']} | "
                     f"{r['block_kv']}x{r['stages']} | {r['kernel_tbps']:.2f} | "
                     + ", ".join(f"{x:.3f}" for x in r.get("kernel_ms_runs", [])) + " |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    cases = [r for r in res["cases"] if "jaxattn_tbps" in r]
    labels = [f"{r['batch']}x{r['ctx'] // 1024}k" for r in cases]
    x = np.arange(len(cases))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, name) in enumerate([("jaxattn_tbps", "jaxattn (paged)"),
                                     ("cudnn_tbps", "cuDNN (contiguous)"),
                                     ("xla_tbps", "XLA (contiguous)")]):
        ax.bar(x + (i - 1) * 0.27, [r.get(key, 0) for r in cases], 0.27, label=name)
    ax.axhline(res["ceilings"]["copy_tbps"], color="k", ls="--", lw=1, label="HBM copy ceiling")
    ax.axhline(0.8 * res["ceilings"]["copy_tbps"], color="gray", ls=":", lw=1, label="80% of it")
    ax.set_xticks(x, labels)
    ax.set_ylabel("K+V bytes read / time (TB/s)")
    ax.set_title(f"Decode, 40/8 heads, D=128, bf16 — {res['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cases(text: str) -> list[tuple[int, int]]:
    """"1x8192,1x64" -> [(1, 8192), (1, 64)]."""
    cases = [case.split("x") for case in text.split(",")]
    if not all(len(c) == 2 and all(n.isdigit() and int(n) > 0 for n in c) for c in cases):
        raise argparse.ArgumentTypeError(f"--cases {text!r}: want BATCHxCONTEXT,... (e.g. 1x8192)")
    return [(int(b), int(c)) for b, c in cases]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", help="redraw table and plot from a results JSON")
    ap.add_argument("--quick", action="store_true", help="main cases only")
    ap.add_argument("--cases", type=_cases, default=CASES,
                    help="batch x context list instead of the issue's four, e.g. 1x8192,1x64 "
                         "(a batch-1 model step's global layer, and a chunked-local layer's "
                         "few keys)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--profile", action="store_true",
                    help="also trace each case's layer: its kernels and their times")
    ap.add_argument("--dependent-launch", action="store_true",
                    help="the layer's kernels (main, combine) each wait for the kernel before "
                         "them on the GPU and launch early (programmatic dependent launch, "
                         "kernels.common.DEPENDENT_LAUNCH; off here by default: "
                         "benchmarks.common.time_kernels_alone says why)")
    ap.add_argument("--page-order", choices=PAGE_ORDERS, default="pages",
                    help="where the pools' pages sit: each page anywhere (default, as in "
                         "every run before session 56), each kernel block's pages together "
                         "(the engine's since session 55), or each sequence's in order (a "
                         "fresh pool's); the last two add a column with each page its own "
                         "copy (DecodeConfig.merge_pages off)")
    args = ap.parse_args(argv)
    time_kernels_alone(args.dependent_launch)
    if args.plot:
        res = json.loads(pathlib.Path(args.plot).read_text())
        stem = pathlib.Path(args.plot).with_suffix("")
        pathlib.Path(f"{stem}.md").write_text(table_md(res))
        plot(res, f"{stem}.png")
        return
    dev = jax.devices()[0]
    res = {"date": datetime.date.today().isoformat(), "device": dev.device_kind,
           "jax": jax.__version__, "config": dataclasses.asdict(decode.default_config()),
           "dependent_launch": args.dependent_launch,
           "page_order": args.page_order,
           "ceilings": ceilings(), "cases": [], "variants": []}
    print(res["ceilings"], flush=True)
    for batch, ctx in args.cases:
        try:
            res["cases"].append(run_case(batch, ctx, res["ceilings"], args.profile,
                                         order=args.page_order))
        except Exception as e:
            res["cases"].append({"batch": batch, "ctx": ctx, "error": f"{type(e).__name__}: {e}"[:500]})
        print(res["cases"][-1], flush=True)
    if not args.quick:
        for batch, ctx in VARIANT_CASES:
            for v in VARIANTS:
                try:
                    res["variants"].append(run_variant(batch, ctx, *v))
                except Exception as e:
                    res["variants"].append({"batch": batch, "ctx": ctx, "page_size": v[0],
                                            "error": f"{type(e).__name__}: {e}"[:500]})
                print(res["variants"][-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"decode-{res['date']}{'-' + args.tag if args.tag else ''}"
    pathlib.Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    pathlib.Path(f"{stem}.md").write_text(table_md(res))
    plot(res, f"{stem}.png")
    print(table_md(res))


if __name__ == "__main__":
    main()
