"""Where a decode attention call's time goes inside its kernels: Mosaic GPU's on-device
trace of the main kernel and the combine at a decode step's shapes, per region and warpgroup.

    python -m benchmarks.kernel_trace --cases 1x64,1x8192      # on a Hopper GPU
    python -m benchmarks.kernel_trace --down 1,8               # the MoE's down launch
    python -m benchmarks.kernel_trace --summarise TRACE.json   # a trace file, any machine

The kernels mark their phases with ``jax.named_scope`` (decode: wait, zero, tile, kv_block,
dequant, stage_q, attend, write, on warpgroup 0 the consumer's and on 1 the producer's with a
bf16 cache, and with ``--fold-combine`` fold, around the merge as the combine has it; combine:
wait, merge (inside it copies and add of a one-token batch, hand_over / take_over, write), on
its two warpgroups; the grouped matmul: wait, tile, slot_wait and
product per K step of its ring, store, on its one warpgroup, where a CTA's first tile is
entered twice, once to copy its first ring of weights before the wait).
Inside ``common.kernel_trace`` each warpgroup records when it enters and leaves them (SM
clock cycles from its first region) and when it started (the global timer, ns), and each
call writes a Chrome trace JSON. :func:`summarise` turns one into a row per (warpgroup,
region): the CTAs that ran it, the median over them of when it first starts (µs after the
kernel's first warpgroup started) and of its time per CTA, the slowest CTA's, and how many
of them filled the profiler's region cap (their totals fall short). The GPU time a profiler
reports for a kernel (``benchmarks.decode --profile``) also holds what no region covers: the
launch of its CTAs, their exit, the time between regions.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile


def sm_clock_ghz() -> float:
    """The GPU's maximum SM clock (what a short kernel runs at), from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"no SM clock from nvidia-smi ({e}): pass --clock-ghz") from e
    return float(out.split()[0]) / 1e3


def summarise(trace: dict, clock_ghz: float, warpgroups: int,
              events: int | None = None) -> list[dict]:
    """Rows (warpgroup, region, ctas, start_us, total_us, max_total_us, full) of a Mosaic GPU
    trace (``traceEvents`` of B/E events; ``tid`` = 1 + warpgroup + ``warpgroups`` x CTA;
    ``ts`` = (the warpgroup's start in ns + cycles since its first region) / 1000). Nested
    regions count in full in each, a region inside one of its own name (a loop body's scope
    opened again inside its loop's) counts once, and a region entered several times per CTA
    adds up. ``full``: of those CTAs, how many recorded ``events`` regions in that
    warpgroup, the profiler's cap (later ones were dropped, so their totals fall short;
    0 where ``events`` is None)."""
    by_trace = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        by_trace[event["tid"]].append(event)
    if not by_trace:
        raise ValueError("the trace holds no events (were the kernels traced anew inside "
                         "common.kernel_trace?)")
    starts = [events[0]["ts"] for events in by_trace.values()]  # µs
    if max(starts) - min(starts) > 1e6:  # the 32-bit nanosecond timer wrapped mid-kernel
        raise ValueError("the warpgroups' start times span over a second: run it again")
    kernel_start = min(starts)
    per_cta = collections.defaultdict(dict)  # (warpgroup, name) -> cta -> [first start, total]
    full = set()  # (warpgroup, cta) whose trace reached the cap
    for tid, trace_events in by_trace.items():
        cta, warpgroup = divmod(tid - 1, warpgroups)
        started = trace_events[0]["ts"]  # its first region begins at 0 cycles
        if events is not None and sum(e["ph"] == "B" for e in trace_events) >= events:
            full.add((warpgroup, cta))
        open_regions = []
        for event in trace_events:
            cycles = (event["ts"] - started) * 1e3
            at = started - kernel_start + cycles / (clock_ghz * 1e3)  # µs
            if event["ph"] == "B":
                open_regions.append((event["name"], at))
                continue
            name, begin = open_regions.pop()
            if name != event["name"]:
                raise ValueError(f"trace {tid}: {event['name']!r} ends inside {name!r}")
            if any(outer == name for outer, _ in open_regions):
                continue  # counted by the outer one
            record = per_cta[warpgroup, name].setdefault(cta, [begin, 0.0])
            record[1] += at - begin
    rows = []
    for (warpgroup, name), ctas in sorted(per_cta.items(), key=lambda kv: (
            kv[0][0], statistics.median(r[0] for r in kv[1].values()))):
        starts, totals = zip(*ctas.values())
        rows.append({"warpgroup": warpgroup, "region": name, "ctas": len(ctas),
                     "start_us": statistics.median(starts),
                     "total_us": statistics.median(totals), "max_total_us": max(totals),
                     "full": sum((warpgroup, cta) in full for cta in ctas)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| warpgroup | region | CTAs | starts at (µs, median) | time per CTA (µs, median) "
             "| slowest CTA (µs) | CTAs whose trace filled |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['warpgroup']} | {r['region']} | {r['ctas']} | {r['start_us']:.2f} | "
              f"{r['total_us']:.2f} | {r['max_total_us']:.2f} | {r['full']} |" for r in rows]
    return "\n".join(lines)


def _warpgroups(trace_path: str) -> int:
    """Warpgroups per CTA of a traced kernel, from its file name (decode: consumer, producer
    with the bf16 cache's default config; combine: its CombineConfig's default)."""
    from jaxattn.kernels import decode_combine

    name = os.path.basename(trace_path)
    if name.startswith("decode_combine"):
        return decode_combine.CombineConfig().warpgroups
    return 1 if name.startswith("grouped_matmul") else 2


def _traced(build, directory: str, events: int, calls: int = 3) -> dict:
    """Calls ``build()`` (a function of no arguments, made inside the trace) ``calls`` times
    inside ``common.kernel_trace`` -> per kernel name, (the last call's trace file, the
    regions a warpgroup could record)."""
    import jax

    from jaxattn.kernels import common

    with common.kernel_trace(directory, events):
        fn = build()
        for _ in range(calls):
            jax.block_until_ready(fn())
    jax.effects_barrier()  # the traces are written by host callbacks
    latest = {}
    for path in sorted(glob.glob(os.path.join(directory, "*-trace.json")), key=os.path.getmtime):
        latest[os.path.basename(path).rsplit("-", 2)[0]] = (path, events)
    return latest


def trace_case(batch: int, ctx: int, directory: str, events: int) -> dict:
    """The decode attention of ``batch`` sequences of ``ctx`` keys (benchmarks.decode's
    setup: Scout's heads, 16-token pages shuffled, the step's plan given), traced:
    :func:`_traced`'s (trace file, region cap) per kernel."""
    from benchmarks import decode as bench

    q, k, v = bench.contiguous(batch, ctx)
    k_pages, v_pages, table_ = bench.paged(k, v, 16)
    return _traced(lambda: bench.jaxattn_fns(batch, ctx, q, k_pages, v_pages, table_, 16,
                                             None)[0], directory, events)


def trace_down(rows: int, directory: str, events: int) -> dict:
    """A batch-1-to-16 decode step's down launch, traced: the routed experts by row and the
    shared expert, f16 rows through FP8 weights (W8A16, 8192 -> 5120), a 16-row bucket with
    ``rows`` real rows on as many experts (benchmarks.fp8_matmul --w8a16's setup): as
    :func:`trace_case`."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.fp8_matmul import E, H, I, _row_experts
    from jaxattn.kernels import fp8, grouped_matmul as gm

    quantize = jax.jit(lambda w: fp8.quantize(w, -1))
    routed = quantize(jax.random.normal(jax.random.key(0), (E, H, I), jnp.bfloat16)
                      / float(np.sqrt(I)))
    shared = quantize(jax.random.normal(jax.random.key(10), (1, H, I), jnp.bfloat16)
                      / float(np.sqrt(I)))
    x16 = jax.random.normal(jax.random.key(3), (32, I), jnp.float16)  # routed, then shared
    config = dataclasses.replace(gm.pick_config(16, I, H, fp8=True, f16_rows=True), block_m=16)
    down = jax.jit(lambda x, g: gm._mosaic_grouped_matmul(
        x, (routed[0], shared[0]), g, (routed[1], shared[1]), config=config, by_row=True,
        shared_blocks=(0, 1), out_dtype=jnp.bfloat16))
    # Two regions a K step (32 of them) and a tile's three: the default 64 would drop the store.
    return _traced(lambda: functools.partial(down, x16, _row_experts(rows)[0]), directory,
                   max(events, 2 * I // config.block_k + 16))


def _bucket_rows(text: str) -> list[int]:
    """"1,8" -> [1, 8]: real rows of a 16-row bucket."""
    rows = [r.strip() for r in text.split(",")]
    if not all(r.isdigit() and 1 <= int(r) <= 16 for r in rows):
        raise argparse.ArgumentTypeError(f"--down {text!r}: want rows 1-16, e.g. 1,8")
    return [int(r) for r in rows]


def main(argv=None) -> int:
    from benchmarks.decode import _cases

    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=_cases, default=[(1, 64), (1, 8192)],
                    help="BATCHxCONTEXT,... (default 1x64,1x8192: a batch-1 step's layers)")
    ap.add_argument("--down", type=_bucket_rows, default=[],
                    metavar="ROWS,...", help="also the MoE's down launch (W8A16, by row with "
                    "the shared expert) at these real rows of a 16-row bucket (1-16)")
    ap.add_argument("--summarise", metavar="TRACE", help="summarise one trace file and exit")
    ap.add_argument("--warpgroups", type=int, help="warpgroups per CTA (--summarise)")
    ap.add_argument("--clock-ghz", type=float, help="SM clock (default: nvidia-smi's maximum)")
    ap.add_argument("--events", type=int, default=64,
                    help="regions recorded per warpgroup (--summarise: the trace's cap)")
    ap.add_argument("--fold-combine", action="store_true",
                    help="the decode cases with the combine folded into the main kernel "
                         "(DecodeConfig.fold_combine: its merge is the fold region of "
                         "warpgroups 0 and 1)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.summarise:
        with open(args.summarise) as f:
            trace = json.load(f)
        try:
            rows = summarise(trace, args.clock_ghz or sm_clock_ghz(),
                             args.warpgroups or _warpgroups(args.summarise), args.events)
        except ValueError as e:
            print(f"{args.summarise}: {e}", file=sys.stderr)
            return 1
        print(table(rows))
        return 0

    import jax

    from benchmarks.common import write_json
    from jaxattn.kernels import common, decode

    if args.fold_combine:
        decode.FOLD_COMBINE = True  # read by default_config

    if not common.on_hopper():
        print("needs a Hopper GPU (the Mosaic kernels and their profiler)", file=sys.stderr)
        return 2
    clock = args.clock_ghz or sm_clock_ghz()
    res = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "clock_ghz": clock, "fold_combine": args.fold_combine,
           "cases": []}
    jobs = ([(f"{b}x{c}", {"batch": b, "context": c}, functools.partial(trace_case, b, c))
             for b, c in args.cases]
            + [(f"down, {r} rows", {"down_rows": r}, functools.partial(trace_down, r))
               for r in args.down])
    for label, case, trace in jobs:
        with tempfile.TemporaryDirectory() as directory:
            for kernel, (path, cap) in trace(directory, args.events).items():
                with open(path) as f:
                    rows = summarise(json.load(f), clock, _warpgroups(path), cap)
                res["cases"].append({**case, "kernel": kernel, "regions": rows})
                print(f"\n{label}: {kernel} (SM clock {clock:.2f} GHz)\n{table(rows)}",
                      flush=True)
    print("wrote", write_json(f"kernel-trace-{res['date']}{args.tag}.json", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
