"""Helpers the benchmark scripts share: where results go, and starting a server."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mode_lengths(spec: str) -> list[tuple[str, int]]:
    """``"causal:4096,chunked:131072"`` -> [("causal", 4096), ("chunked", 131072)]."""
    return [(m, int(n)) for m, n in (c.split(":") for c in spec.split(","))]


def variants_table(names, columns: list[str], rows, cell) -> list[str]:
    """Markdown lines of a variants-by-cases table: a row per variant name, a column per
    case (``columns`` its titles, ``rows`` its results); ``cell(row, name)`` is the text,
    or None for a variant that did not build there ("error")."""
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for n in names:
        cells = [cell(r, n) or "error" for r in rows]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def write_json(name: str, data) -> str:
    """Write ``data`` to benchmarks/results/NAME, and to $OUT/NAME when the device tool sets it."""
    return write_text(name, json.dumps(data, indent=2))


def write_report(stem: str, data, md: str) -> None:
    """STEM.json (``data``) and STEM.md (``md``) where :func:`write_text` puts them; ``md`` on
    stdout too."""
    write_json(stem + ".json", data)
    write_text(stem + ".md", md)
    print(md)


def write_text(name: str, text: str) -> str:
    """Write ``text`` to benchmarks/results/NAME, and to $OUT/NAME when the device tool sets it."""
    os.makedirs(RESULTS, exist_ok=True)
    paths = [os.path.join(RESULTS, name)]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], name))
    for path in paths:
        with open(path, "w") as f:
            f.write(text)
    return paths[0]


def time_kernels_alone(dependent_launch: bool = False) -> None:
    """For the kernel benchmarks, which sum each call's kernel spans from CUPTI: with
    programmatic dependent launch (on by default when serving, kernels.common.DEPENDENT_LAUNCH)
    a kernel starts before the one ahead of it ends and waits on the GPU, so its span would
    count that wait. They time kernels without it unless asked. Before the kernels are traced."""
    from jaxattn.kernels import common

    common.DEPENDENT_LAUNCH = dependent_launch


def gpu_ms(f, *args, reps: int = 20) -> float:
    """Median ms of ``f(*args)``: the GPU time of its kernels (CUPTI) where that works, else
    the wall clock per call. Kernel time leaves out host dispatch, which at decode sizes
    (tens of microseconds) would otherwise be what a loop of calls measures."""
    import jax

    jax.block_until_ready(f(*args))
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(f, iterations=reps)(*args)
        if times:
            return statistics.median(times)
    except Exception:  # noqa: BLE001 - no CUPTI here: fall back to the wall clock
        pass
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def gpu_rounds(calls: dict, rounds: int, measure=None, around=None) -> dict[str, list]:
    """Each of ``calls`` (name -> (f, args)) measured once a round for ``rounds`` rounds:
    name -> its ``rounds`` results. ``measure(f, *args)`` (default :func:`gpu_ms`) gives a
    result; ``around(name)``, if given, is a context each measurement runs in. The rounds
    go in pairs: a seeded shuffled order, then the same reversed. So a drift of the GPU's
    clocks or temperature reaches all of them alike (each pair gives every call the same
    mean position: two calls alternate), and no call always follows the same neighbour (a
    call's time can depend on what ran before it: benchmarks/NOTES-decode.md, session 41)."""
    measure = measure or gpu_ms
    out = {name: [] for name in calls}
    order = random.Random(0)
    for r in range(rounds):
        if r % 2 == 0:
            names = list(calls)
            order.shuffle(names)
        else:
            names.reverse()
        for name in names:
            f, args = calls[name]
            with around(name) if around else contextlib.nullcontext():
                out[name].append(measure(f, *args))
    return out


def trace_summary(fn, reps: int = 3, top: int = 15) -> dict:
    """Where ``fn()``'s time goes, from a jax.profiler trace of ``reps`` calls (after one
    untraced call), per call: GPU kernels by total time on device 0 (``kernels``, with the
    kernel count and busy time; each row keeps its first event's profiler stats, such as
    the HLO op that launched it, and that op's own stats from the "XLA Ops" line), and the
    host threads' events by total time (``host``: the launches, graph updates and
    collectives that keep a small step host-bound). Host events nest, so their times
    overlap; they rank causes, they do not add up."""
    import jax
    from jax.profiler import ProfileData

    fn()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(reps):
                fn()
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    kernels: dict[str, list] = {}
    starts: dict[str, list] = {}  # each kernel's events on device 0: (start ns, duration ns)
    host: dict[str, list] = {}
    stats: dict[str, dict] = {}  # a kernel's first event's stats: which HLO op launched it
    ops: dict[str, dict] = {}  # the "XLA Ops" line's stats per HLO op (its JAX op name)
    for plane in data.planes:
        if plane.name.startswith("/device:GPU:0"):
            for line in plane.lines:
                if line.name == "XLA Ops":
                    for ev in line.events:
                        ops.setdefault(ev.name, _event_stats(ev))
            lines, into = [ln for ln in plane.lines if ln.name.startswith("Stream")], kernels
        elif plane.name.startswith("/host:CPU"):
            lines, into = list(plane.lines), host
        else:
            continue  # other GPUs repeat device 0's kernels; XLA Ops/Modules lines summarise
        for line in lines:
            for ev in line.events:
                t = into.setdefault(ev.name, [0.0, 0])
                t[0] += ev.duration_ns
                t[1] += 1
                if into is kernels:
                    starts.setdefault(ev.name, []).append((ev.start_ns, ev.duration_ns))
                if into is kernels and ev.name not in stats:
                    stats[ev.name] = _event_stats(ev)
                    op = ops.get(stats[ev.name].get("hlo_op", ""))
                    if op:
                        stats[ev.name]["op"] = op

    def rows(total):
        out = sorted(({"name": k[:100], "ms": round(v[0] / reps / 1e6, 4), "calls": v[1] // reps}
                      | ({"stats": stats[k]} if stats.get(k) else {})
                      | ({"per_call_us": per_call_us(starts[k], reps)} if k in starts
                         and v[1] // reps >= PER_CALL_MIN else {})
                      for k, v in total.items()), key=lambda r: -r["ms"])
        return out[:top]

    by_kind: dict[str, list] = {}
    for name, (ns, calls) in kernels.items():
        t = by_kind.setdefault(kernel_kind(name), [0.0, 0])
        t[0] += ns
        t[1] += calls
    return {"kernels": rows(kernels), "host": rows(host), "kinds": rows(by_kind),
            "timeline": timeline([(t0, d, k) for k, evs in starts.items() for t0, d in evs],
                                 reps),
            "kernel_ms": round(sum(v[0] for v in kernels.values()) / reps / 1e6, 4),
            "kernel_calls": sum(v[1] for v in kernels.values()) // reps,
            # Counted apart: a Mosaic custom call has FFI prepare and initialize stages, which
            # XLA appears to run on every execution (NOTES-fp8.md, session 39).
            "mosaic_calls": sum(v[1] for k, v in kernels.items() if "mosaic" in k) // reps}


def timeline(events, reps: int, top: int = 12, call_gap_ns: float = 200e3) -> dict:
    """Device 0's timeline per call from its kernels' ``events`` (start ns, duration ns,
    name) over ``reps`` calls: ``busy_ms``, the time some kernel runs (the union of their
    intervals: with programmatic dependent launch a kernel starts before the one it waits
    for ends, so the kernels' summed times overstate the step); ``idle_ms``, the gaps
    between kernels within a call (gaps longer than ``call_gap_ns`` are taken to lie
    between calls, where the host runs); ``gaps``: the idle time after each kind of
    kernel before the next (``"a -> b"``: names cut at "_mosaic"), largest first."""
    cut = lambda n: n.split("_mosaic")[0][:48]
    busy = idle = 0.0
    gaps: dict[str, list] = {}
    end, before = None, None
    for t0, d, name in sorted(events):
        if end is not None and t0 > end:
            gap = t0 - end
            if gap < call_gap_ns:
                idle += gap
                g = gaps.setdefault(f"{cut(before)} -> {cut(name)}", [0.0, 0])
                g[0] += gap
                g[1] += 1
        if end is None or t0 + d > end:
            busy += t0 + d - max(t0, end) if end is not None else d
            end, before = t0 + d, name
    rows = sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]
    return {"busy_ms": round(busy / reps / 1e6, 4), "idle_ms": round(idle / reps / 1e6, 4),
            "gaps": [{"after": k, "us": round(v[0] / reps / 1e3, 2), "count": v[1] // reps}
                     for k, v in rows]}


# Kernels called at least this often per call of the profiled function get their time per
# call index (a step's kernel of every layer: which layers' calls are the slow ones).
PER_CALL_MIN = 8


def per_call_us(events, reps: int) -> list[float] | None:
    """A kernel's mean time in µs for each of its calls within one call of the profiled
    function, in launch order: ``events`` its (start ns, duration ns) over ``reps`` calls,
    each making the same launches. None if the count is not a multiple of ``reps``."""
    if not events or len(events) % reps:
        return None
    times = [d for _, d in sorted(events)]
    calls = len(times) // reps
    return [round(sum(times[r * calls + i] for r in range(reps)) / reps / 1e3, 2)
            for i in range(calls)]


def _event_stats(ev) -> dict:
    """A profiler event's stats as short strings (a GPU kernel's carry the HLO op and
    module that launched it), or {} where the profiler gives none."""
    try:
        return {str(k): str(v)[:160] for k, v in ev.stats if not str(k).startswith("_")}
    except Exception:  # noqa: BLE001 - the stats' form is the profiler's, not ours
        return {}


# GPU kernel names -> what they do, first match wins (our Mosaic kernels are named after
# their Python functions; XLA names fusions after their root op; cuBLAS's are nvjet/sm90_*).
_KERNEL_KINDS = (
    ("attention", re.compile(r"^(decode_kernel|decode_combine_kernel|prefill_kernel)_mosaic")),
    # Mosaic's grouped matmul runs the experts and, at decode, the FP8 dense projections
    # (grouped_matmul[_fp8][_by_row]_n<N>_k<K>; grouped_matmul_kernel before 2026-12-02).
    ("grouped matmul", re.compile(r"^grouped_matmul\w*_mosaic")),
    ("row kernels", re.compile(r"^(quantize|\w*rms_norm_quantize\w*|swiglu_quantize)_mosaic")),
    ("dense matmul", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|cublas", re.I)),
    ("collectives", re.compile(r"psum|all_reduce|all-reduce|allreduce|all_gather|nccl", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
    ("scatter/gather", re.compile(r"scatter|gather|dynamic_slice|dynamic_update", re.I)),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name (see ``_KERNEL_KINDS``); "other" if none."""
    return next((kind for kind, rx in _KERNEL_KINDS if rx.search(name)), "other")


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Block until ``url``/health answers 200; RuntimeError if the server exits or is too slow."""
    import httpx  # imported here: only the serving benchmarks need it

    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("the server did not start in time")
        time.sleep(0.5)


# nvidia-smi's clocks_event_reasons bits (nvml.h: nvmlClocksEventReason*).
_CLOCK_EVENTS = {0x1: "idle", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal",
                 0x40: "hw_thermal", 0x80: "hw_power_brake"}


class GpuClockLog:
    """SM clock, power draw and clock-event reasons, sampled by ``nvidia-smi`` in the background.

    Timing alone cannot tell a slower kernel from a slower clock: an H100 at its power
    limit lowers its SM clock under sustained tensor-core load. ``window(t0, t1)``
    summarises the samples taken between two ``time.time()`` stamps. Without
    nvidia-smi every window is None.
    """

    _QUERY = "timestamp,clocks.sm,power.draw,power.limit,clocks_event_reasons.active"

    def __init__(self, path: str, interval_ms: int = 50):
        self.path = path
        self._file = open(path, "w")
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self._QUERY}", "--format=csv,noheader,nounits",
                 "-lms", str(interval_ms)], stdout=self._file, stderr=subprocess.DEVNULL)
        except OSError:
            self._proc = None

    def _samples(self):
        import datetime

        out = []
        with open(self.path) as lines:
            rows = [[x.strip() for x in line.split(",")] for line in lines]
        for f in rows:
            try:
                t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                out.append((t, float(f[1]), float(f[2]), float(f[3]), int(f[4], 16)))
            except (ValueError, IndexError):
                continue  # a partly written last line, or "[N/A]"
        return out

    def window(self, t0: float, t1: float):
        import statistics

        if self._proc is None:
            return None
        s = [x for x in self._samples() if t0 <= x[0] <= t1]
        if not s:
            return None
        reasons = 0
        for x in s:
            reasons |= x[4]
        return dict(samples=len(s), sm_mhz_median=statistics.median(x[1] for x in s),
                    sm_mhz_min=min(x[1] for x in s),
                    power_w_median=statistics.median(x[2] for x in s), power_limit_w=s[0][3],
                    clock_events=[n for bit, n in _CLOCK_EVENTS.items() if reasons & bit])

    def close(self):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        self._file.close()
