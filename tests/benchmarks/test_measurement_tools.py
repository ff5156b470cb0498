"""The benchmarks' measurement helpers: the nvidia-smi clock log, the Nsight Compute report
parser, the profile's kernel kinds and the step's kernel listing (their GPU runs cannot
check that they read what the tools write)."""

import datetime
import os
import sys

import pytest

# benchmarks/ is a folder of the repository, not of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import common, profile_attention, step_kernels  # noqa: E402


def _stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # nvidia-smi's format: milliseconds


def test_clock_log_window_summarises_only_its_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no nvidia-smi: the log only reads its file
    log = common.GpuClockLog(str(tmp_path / "smi.csv"))
    assert log.window(0, 1e12) is None  # nothing to sample without nvidia-smi
    t0 = datetime.datetime(2026, 11, 25, 9, 10, 0)
    rows = [(0.0, 1980, 120.0, "0x0000000000000001"),  # before the window
            (1.0, 1500, 698.5, "0x0000000000000004"),
            (1.5, 1290, 699.9, "0x0000000000000004"),
            (2.0, 1530, 697.0, "0x0000000000000000"),
            (9.0, 1980, 110.0, "0x0000000000000001")]  # after it
    with open(log.path, "w") as f:
        for dt, mhz, watts, reasons in rows:
            f.write(f"{_stamp(t0 + datetime.timedelta(seconds=dt))}, {mhz}, {watts}, 700.00, {reasons}\n")
        f.write("2026/11/25 09:10:0")  # a line nvidia-smi is still writing
    log._proc = object()  # as if nvidia-smi were running
    w = log.window(t0.timestamp() + 0.5, t0.timestamp() + 3)
    assert w == dict(samples=3, sm_mhz_median=1500.0, sm_mhz_min=1290.0, power_w_median=698.5,
                     power_limit_w=700.0, clock_events=["sw_power_cap"])
    assert log.window(t0.timestamp() + 3, t0.timestamp() + 4) is None
    log._proc = None
    log.close()


def test_ncu_raw_page_is_parsed_by_column_name():
    raw = ('==PROF== noise before the table\n'
           '"ID","Kernel Name","gpu__time_duration.sum","smsp__inst_executed.sum"\n'
           '"","","ms","inst"\n'
           '"0","prefill_kernel_mosaic_gpu_kernel","15.69","5,639,127,832"\n')
    m = profile_attention._parse_raw(raw)
    assert m["Kernel Name"][0] == "prefill_kernel_mosaic_gpu_kernel"
    assert m["gpu__time_duration.sum"] == ("15.69", "ms")
    assert profile_attention._number(m["smsp__inst_executed.sum"][0]) == 5_639_127_832


def test_ncu_byte_units_and_decode_sizes():
    assert profile_attention._bytes(1073.74, "Mbyte") == pytest.approx(1.07374e9)
    assert profile_attention._bytes(2.5, "Kbyte") == 2500
    with pytest.raises(ValueError, match="byte unit"):
        profile_attention._bytes(1.0, "sector")
    assert profile_attention._decode_size("32x8192") == (32, 8192)


@pytest.mark.parametrize("name,kind", [
    ("decode_kernel_mosaic_gpu_kernel", "attention"),
    ("decode_combine_kernel_mosaic_gpu_kernel", "attention"),
    ("prefill_kernel_mosaic_gpu_kernel", "attention"),
    ("grouped_matmul_kernel_mosaic_gpu_kernel", "grouped matmul"),
    ("grouped_matmul_fp8_by_row_n16384_k5120_mosaic_gpu_kernel", "grouped matmul"),
    ("add_rms_norm_quantize_route_mosaic_gpu_kernel", "row kernels"),
    ("quantize_mosaic_gpu_kernel", "row kernels"),
    ("swiglu_quantize_mosaic_gpu_kernel", "row kernels"),
    ("gemm_fusion_dot_98", "dense matmul"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coo", "dense matmul"),
    ("psum_684_0_fusion_1", "collectives"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collectives"),
    ("memcpy32_post", "copies"),
    ("input_scatter_fusion_193", "scatter/gather"),
    ("loop_multiply_fusion_143", "other"),
])
def test_profile_kernels_are_sorted_by_kind(name, kind):
    """The names the H200 profiles of a Scout step list (multigpu-2026-11-30-*.json)."""
    assert common.kernel_kind(name) == kind


def test_gpu_ms_falls_back_to_the_wall_clock_without_cupti():
    """On a machine without CUPTI (this CPU) the timer still answers: wall time per call,
    which grows with the work done."""
    import jax
    import jax.numpy as jnp

    small = jax.jit(lambda x: x + 1)
    big = jax.jit(lambda x: jnp.linalg.matrix_power(x, 40))
    x = jnp.ones((256, 256), jnp.float32)
    t_small, t_big = common.gpu_ms(small, x, reps=5), common.gpu_ms(big, x, reps=5)
    assert 0 < t_small < t_big


def test_interleaved_rotation_runs_each_argument_set_and_counts_each_call(monkeypatch):
    """A list of argument tuples is a rotation (other weights per call, out of L2's reach):
    each set runs once per timed call, and the time is per call."""
    import jax.numpy as jnp

    from benchmarks import fp8_matmul

    seen = []
    monkeypatch.setattr(common, "gpu_ms", lambda f, *a, reps: seen.append(f(*a)) or 12.0)
    sets = [(jnp.full((2,), float(i)),) for i in range(3)]
    t = fp8_matmul.interleaved({"plain": lambda x: x + 1, "rotated": lambda x: x * 2},
                               {"plain": sets[0], "rotated": sets}, rounds=2, reps=1)
    assert t == {"plain": 12.0 / 1e3, "rotated": 12.0 / 1e3 / 3}
    assert [float(y[0]) for y in seen[1]] == [0.0, 2.0, 4.0]  # every set, in order


def test_decode_interleaved_varies_who_runs_before_whom():
    """benchmarks.decode's wall-time rounds: every callable timed once a round, and no
    callable always behind the same one (a fixed order biased a column by 2-4%)."""
    from benchmarks import decode as decode_bench

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcdefg"}
    t = decode_bench.interleaved(fns, n=1, reps=7)
    assert set(t) == set(fns)
    rounds = [calls[7 * (r + 1):7 * (r + 2)] for r in range(7)]  # after the warm-up calls
    assert all(sorted(r) == list("abcdefg") for r in rounds)
    behind = {name: {r[r.index(name) - 1] for r in rounds if r.index(name)} for name in fns}
    assert all(len(b) > 1 for b in behind.values()), behind


def test_decode_cases_option_parses_and_refuses_clearly():
    import argparse

    from benchmarks import decode as decode_bench

    assert decode_bench._cases("1x8192,1x64") == [(1, 8192), (1, 64)]
    for bad in ("1x", "8192", "1x2x3", "0x64", "ax64"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCHxCONTEXT"):
            decode_bench._cases(bad)


def test_decode_table_puts_both_kernels_against_the_tma_ring():
    """The GPU-time table gives jaxattn's and cuDNN's read rate as a share of the same run's
    TMA-ring ceiling (benchmarks.read_ceiling), and a dash for runs made before it existed."""
    from benchmarks import decode as decode_bench

    row = dict(batch=32, ctx=8192, pieces=32, kv_bytes=1.0737e9, jaxattn_ms=0.36,
               jaxattn_tbps=2.98, jaxattn_frac_of_copy=1.0, plan_ms=0.5,
               jaxattn_device_ms=0.3600, cudnn_device_ms=0.3500, jaxattn_kernels=[])
    res = dict(device="H100", date="d", cases=[row], variants=[],
               ceilings=dict(copy_tbps=2.9, read_tbps=3.0, ring_tbps=3.1))
    line = next(x for x in decode_bench.table_md(res).splitlines()
                if x.startswith("| 32x8192 | 360.0"))
    assert "| 96.2%, 99.0% |" in line  # 1.0737 GB in 360 / 350 µs against 3.1 TB/s
    del res["ceilings"]["ring_tbps"]
    line = next(x for x in decode_bench.table_md(res).splitlines()
                if x.startswith("| 32x8192 | 360.0"))
    assert "| 0.972 | — |" in line


# An XLA dump's optimised module, cut to its shape: source tables, then the entry.
_MODULE = """HloModule jit_jitted, is_scheduled=true

FileNames
1 "/work/main/serve/paged_step.py"
2 "/work/main/kernels/fp8.py"
FunctionNames
1 "step"
2 "quantize"
FileLocations
1 {file_name_id=1 function_name_id=1 line=362 end_line=362 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=46 end_line=46 column=1 end_column=2}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}

%fused_reduce (p: bf16[16,5120]) -> f32[16] {
  %p = bf16[16,5120]{1,0} parameter(0)
}

ENTRY %main.1 (x: bf16[16,5120]) -> f32[16] {
  %x = bf16[16,5120]{1,0} parameter(0)
  %input_reduce_fusion.5 = f32[16]{0} fusion(%x), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(jitted)/reduce_max" stack_frame_id=2}
  %bitcast.1 = f32[16]{0} bitcast(%input_reduce_fusion.5)
  ROOT %gemm = (f32[4,16]{1,0}, s8[64]{0}) custom-call(%x), custom_call_target="__cublas$lt$matmul$f8", metadata={op_name="jit(jitted)/dot_general" stack_frame_id=1}
}
"""


def test_step_kernels_lists_the_entry_kernels_with_their_model_frames():
    found = step_kernels.kernels(_MODULE)
    assert [k["name"] for k in found] == ["input_reduce_fusion.5", "gemm"]  # not the bitcast
    assert found[0]["kind"] == "kInput" and found[0]["source"] == ["fp8.py:46:quantize"]
    assert found[1]["kind"] == "__cublas$lt$matmul$f8"
    assert found[1]["source"] == []  # the driver's own frame is left out


def test_gpu_rounds_measure_each_call_once_a_round_in_varying_order():
    """The kernel benchmarks' shared rounds: each call measured once a round with its own
    arguments, its results in round order under its name, inside ``around(name)``, a
    shuffled round then its reverse, and no call always behind the same one (a fixed order
    biased a column by 2-4%)."""
    import contextlib

    calls, inside = [], []

    @contextlib.contextmanager
    def around(name):
        inside.append(name)
        yield
        inside.pop()

    def measure(f, *args):
        assert inside == [f]  # measured inside its own context
        calls.append((f, args))
        return float(len(calls))

    fns = {name: (name, (i,)) for i, name in enumerate("abcdefg")}
    times = common.gpu_rounds(fns, rounds=7, measure=measure, around=around)
    assert sorted(calls) == sorted(fns[n] for n in fns for _ in range(7))
    rounds = [[f for f, _ in calls[7 * r:7 * (r + 1)]] for r in range(7)]
    assert all(sorted(r) == list("abcdefg") for r in rounds)
    assert all(times[n] == [1.0 + 7 * r + rounds[r].index(n) for r in range(7)] for n in fns)
    assert all(rounds[r + 1] == rounds[r][::-1] for r in (0, 2, 4))  # pairs: same mean place
    behind = {name: {r[r.index(name) - 1] for r in rounds if r.index(name)} for name in fns}
    assert all(len(b) > 1 for b in behind.values()), behind


def test_gpu_rounds_alternate_two_calls():
    calls = []
    common.gpu_rounds({"a": ("a", ()), "b": ("b", ())}, rounds=4,
                      measure=lambda f: calls.append(f))
    assert calls[0:2] == calls[2:4][::-1] and calls[4:6] == calls[6:8][::-1]


def test_prefill_rounds_take_each_callables_own_arguments(monkeypatch):
    from benchmarks import prefill

    calls = []
    monkeypatch.setattr(prefill, "_measure",
                        lambda f, *args, target_ms: calls.append((f, args)) or {"ms": 1.0})
    times = prefill._rounds({"a": "fa", "b": "fb"}, {"a": (1,), "b": (2, 3)}, rounds=2)
    assert sorted(calls) == [("fa", (1,)), ("fa", (1,)), ("fb", (2, 3)), ("fb", (2, 3))]
    assert times == {"a": [{"ms": 1.0}] * 2, "b": [{"ms": 1.0}] * 2}
    prefill._rounds({"a": "fa", "b": "fb"}, (4,), rounds=1)
    assert sorted(calls[4:]) == [("fa", (4,)), ("fb", (4,))]


@pytest.mark.parametrize("shuffle", [True, False])
def test_paged_pools_hold_the_sequence_in_table_order(shuffle):
    """The paging columns' pools: page i of the sequence sits at pool row table[i] (in order:
    row i), with the tail past kv_len zero-padded."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import prefill

    kv_len, page = 100, 32
    k = jnp.arange(kv_len * prefill.HKV * prefill.D, dtype=jnp.float32).reshape(
        kv_len, prefill.HKV, prefill.D)
    _, (_, kp, vp, table, _, kv_lens, _) = prefill._paged_step_fn(k[:8], k, k, page, None,
                                                                  shuffle)
    seq = np.asarray(kp)[table[0]].reshape(-1, prefill.HKV, prefill.D)
    np.testing.assert_array_equal(seq[:kv_len], np.asarray(k))
    assert not seq[kv_len:].any() and int(kv_lens[0]) == kv_len
    assert (table[0] == np.arange(len(table[0]))).all() != shuffle


@pytest.mark.parametrize("order", ["pages", "blocks", "in-order"])
def test_decode_pools_hold_each_sequence_in_table_order(order):
    """benchmarks.decode's pools (and decode_layout's): sequence b's page i sits at pool row
    table[b, i], the tail past ctx zero-padded; "in-order": row b * pages + i; "blocks":
    each 8-page block's rows consecutive, the blocks not in order; "pages": scattered."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import decode

    batch, ctx, page = 3, 300, 16  # 19 pages a sequence: 3 blocks under "blocks"
    k = jnp.arange(batch * ctx * decode.HKV * decode.D, dtype=jnp.float32).reshape(
        batch, ctx, decode.HKV, decode.D)
    kp, vp, table = decode.paged(k, k, page, order=order)
    table = np.asarray(table)
    seqs = np.asarray(kp)[table].reshape(batch, -1, decode.HKV, decode.D)
    np.testing.assert_array_equal(seqs[:, :ctx], np.asarray(k))
    assert not seqs[:, ctx:].any() and (np.asarray(vp) == np.asarray(kp)).all()
    blocks = table.reshape(-1, 8) if order == "blocks" else table[:, :16].reshape(-1, 8)
    in_runs = (np.diff(blocks, axis=1) == 1).all(axis=1)
    assert in_runs.all() == (order != "pages") and not (order == "pages" and in_runs.any())
    in_order = (table.ravel() == np.arange(table.size)).all()
    assert in_order == (order == "in-order")


def test_paging_table_has_a_column_per_pool():
    from benchmarks import prefill

    names = ["contiguous"] + [n for n, *_ in prefill.PAGINGS]
    entry = dict(mode="chunked", length=131072, ms={n: 2.0 for n in names},
                 tflops={n: 500.0 for n in names}, spread={n: 1.01 for n in names})
    md = prefill.markdown(dict(date="d", device="H200", jax="0.11.2", lengths=[], sustained=[],
                               variants=[], varlen=[],
                               paging=[entry, dict(mode="causal", length=8192, error="boom")]))
    line = next(x for x in md.splitlines() if x.startswith("| chunked 131072"))
    assert line.count("(500, 1.000)") == len(names) and "| causal 8192 | error: boom |" in md


def test_per_call_times_follow_launch_order_over_the_reps():
    """Two reps of a function that launches one kernel three times: each call index's mean,
    in start order whatever order the trace lists the events in."""
    events = [(30, 3000), (10, 1000), (20, 2000),  # rep 0 (listed out of order)
              (110, 3000), (130, 5000), (120, 4000)]  # rep 1
    assert common.per_call_us(events, reps=2) == [2.0, 3.0, 4.0]
    assert common.per_call_us(events[:5], reps=2) is None  # a rep lost an event


def test_timeline_counts_overlapping_kernels_once_and_names_the_gaps():
    """Two calls (reps=2) of: a; b launched early (programmatic dependent launch) and
    overlapping a; a 3 us gap; c. The calls lie 1 ms apart: that gap is the host's."""
    us = 1000
    call = [(0, 10 * us, "a_mosaic_gpu_kernel"), (4 * us, 10 * us, "b_mosaic_gpu_kernel"),
            (17 * us, 5 * us, "c_fusion")]
    events = call + [(t + 1_000 * us, d, n) for t, d, n in call]
    got = common.timeline(events, reps=2)
    assert got["busy_ms"] == pytest.approx(0.019)  # 0-14 and 17-22 us, per call
    assert got["idle_ms"] == pytest.approx(0.003)
    assert got["gaps"] == [{"after": "b -> c_fusion", "us": 3.0, "count": 1}]


def test_a_layers_kernel_is_split_by_attention_kind():
    """Scout's pattern (every fourth layer global): the decode kernel's calls in layer order,
    slow on global layers, averaged per kind; kernels not run once a layer are left out."""
    from benchmarks import multigpu
    from jaxattn.models.llama4 import Llama4Config

    config = Llama4Config.from_hf_dict(dict(num_hidden_layers=8))  # HF's Scout defaults
    pattern = [8192] * 3 + [None]
    assert [config.layer_chunk_size(i) for i in range(8)] == pattern * 2
    rows = [{"name": "decode_kernel_mosaic_gpu_kernel",
             "per_call_us": [5.0, 5.0, 6.0, 20.0, 4.0, 6.0, 4.0, 22.0]},
            {"name": "sort_45_1", "per_call_us": [1.0] * 2},
            {"name": "gemm_fusion_dot_general_1"}]
    assert multigpu.by_layer_kind(rows, config) == {
        "decode_kernel_mosaic_gpu_kernel": {"global": 21.0, "chunked": 5.0}}


def test_multigpu_switches_set_their_module_flags(monkeypatch):
    """Each --flag / --no-flag of benchmarks.multigpu's step switches sets the module
    global the step reads, and nothing else."""
    import importlib

    from benchmarks import multigpu

    for switch in multigpu.SWITCHES:  # restored after the test
        module = importlib.import_module(switch.module)
        monkeypatch.setattr(module, switch.name, getattr(module, switch.name))
    args = multigpu.build_parser().parse_args(["--no-swiglu-in-gate-up", "--router-in-smem",
                                                  "--no-dependent-launch", "--no-merge-pages",
                                                  "--fold-combine", "--no-joint-router-sums"])
    multigpu.apply_switches(args)
    got = {s.flag: getattr(importlib.import_module(s.module), s.name) for s in multigpu.SWITCHES}
    assert got == {"route_in_norm": True, "static_o_scale": True, "swiglu_in_gate_up": False,
                   "router_in_smem": True, "joint_router_sums": False, "merge_pages": False,
                   "fold_combine": True, "dependent_launch": False}


def _trace(events_by_trace, start_ns):
    """A Mosaic GPU trace as its profiler dumps it: per trace (tid), (name, B/E, cycles since
    its first region), its start ``start_ns[tid]``; ts = (start + cycles) / 1000."""
    return {"traceEvents": [
        {"name": name, "ph": ph, "ts": (start_ns[tid] + cycles) / 1e3, "pid": 1, "tid": tid}
        for tid, events in events_by_trace.items() for name, ph, cycles in events]}


def test_kernel_trace_summary_per_warpgroup_and_region():
    """kernel_trace.summarise: regions per (warpgroup, region) over CTAs, starts from the
    kernel's first warpgroup start (ns) plus cycles at the clock, nested regions in full,
    one inside its own name once, and repeated ones added up per CTA."""
    from benchmarks import kernel_trace

    # 2 warpgroups a CTA: tid = 1 + warpgroup + 2 * cta. At 2 GHz, 2000 cycles are 1 us.
    events = {
        1: [("wait", "B", 0), ("wait", "E", 2000), ("attend", "B", 4000), ("attend", "E", 8000)],
        2: [("tile", "B", 0), ("tile", "B", 500), ("kv_block", "B", 1000),
            ("kv_block", "E", 3000), ("kv_block", "B", 3000), ("kv_block", "E", 4000),
            ("tile", "E", 5000), ("tile", "E", 6000)],  # a scope opened again inside itself
        3: [("wait", "B", 0), ("wait", "E", 6000), ("attend", "B", 6000), ("attend", "E", 8000)],
        4: [("tile", "B", 0), ("kv_block", "B", 0), ("kv_block", "E", 2000), ("tile", "E", 2000)],
    }
    start = {1: 10_000, 2: 10_500, 3: 12_000, 4: 11_000}  # ns: CTA 1 starts 2 us late
    rows = kernel_trace.summarise(_trace(events, start), clock_ghz=2.0, warpgroups=2,
                                  events=3)
    got = {(r["warpgroup"], r["region"]): r for r in rows}
    assert [(r["warpgroup"], r["region"]) for r in rows] == [
        (0, "wait"), (0, "attend"), (1, "tile"), (1, "kv_block")]  # by warpgroup, then start
    assert got[0, "wait"] == dict(warpgroup=0, region="wait", ctas=2, start_us=1.0,
                                  total_us=2.0, max_total_us=3.0, full=0)
    # CTA 0's producer entered 4 regions, the cap of 3 (CTA 1's 2): its totals fall short.
    assert got[1, "tile"]["full"] == got[1, "kv_block"]["full"] == 1
    assert got[0, "attend"]["start_us"] == pytest.approx(3.5)  # CTA 0 at 2 us, CTA 1 at 5
    assert got[1, "kv_block"]["total_us"] == pytest.approx(1.25)  # CTA 0: 1.5 us in two, CTA 1: 1
    assert got[1, "tile"]["max_total_us"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="over a second"):  # the ns timer wrapped
        kernel_trace.summarise(_trace(events, {**start, 4: 3_000_000_000}), 2.0, 2)
    with pytest.raises(ValueError, match="no events"):
        kernel_trace.summarise({"traceEvents": []}, 2.0, 2)
    with pytest.raises(ValueError, match="ends inside"):
        kernel_trace.summarise(_trace({1: [("a", "B", 0), ("b", "B", 1), ("a", "E", 2),
                                           ("b", "E", 3)]}, {1: 0}), 2.0, 1)


def test_kernel_trace_main_summarises_each_case(monkeypatch):
    """kernel_trace.main: each decode case and down row count traced once, its kernels'
    traces summarised under the case's keys (the GPU parts replaced by a written trace)."""
    import json

    from benchmarks import common as bench_common, kernel_trace
    from jaxattn.kernels import common as kernel_common

    def fake(name, *key):
        def trace(directory, events):
            path = os.path.join(directory, f"{name}-1-trace.json")
            with open(path, "w") as f:
                json.dump(_trace({1: [("wait", "B", 0), ("wait", "E", 2000)]}, {1: 0}), f)
            calls.append((name, *key, events))
            return {name: (path, 1)}
        return trace

    calls, written = [], {}
    monkeypatch.setattr(kernel_common, "on_hopper", lambda: True)
    monkeypatch.setattr(kernel_trace, "trace_case",
                        lambda b, c, *a: fake("decode_kernel", b, c)(*a))
    monkeypatch.setattr(kernel_trace, "trace_down", lambda r, *a: fake("grouped_matmul", r)(*a))
    monkeypatch.setattr(bench_common, "write_json", lambda name, res: written.update({name: res}))
    assert kernel_trace.main(["--cases", "1x64,2x8192", "--down", "8", "--clock-ghz", "2",
                              "--tag=-t"]) == 0
    assert calls == [("decode_kernel", 1, 64, 64), ("decode_kernel", 2, 8192, 64),
                     ("grouped_matmul", 8, 64)]
    [(name, res)] = written.items()
    assert name.startswith("kernel-trace-") and name.endswith("-t.json")
    keys = [{k: v for k, v in c.items() if k != "regions"} for c in res["cases"]]
    assert keys == [{"batch": 1, "context": 64, "kernel": "decode_kernel"},
                    {"batch": 2, "context": 8192, "kernel": "decode_kernel"},
                    {"down_rows": 8, "kernel": "grouped_matmul"}]
    assert res["cases"][0]["regions"] == [dict(warpgroup=0, region="wait", ctas=1,
                                               start_us=0.0, total_us=1.0, max_total_us=1.0,
                                               full=1)]  # one region, a cap of 1
