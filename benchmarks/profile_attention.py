"""Hardware counters of the attention kernels next to cuDNN's, from Nsight Compute.

Run on the GPU with ``bash benchmarks/gpu.sh profile`` (or ``python -m
benchmarks.profile_attention``). For each shape, ``ncu`` profiles the first launch of
jaxattn's kernel and of cuDNN's, one process each, in the same run: prefill (causal, one
sequence of ``PROFILE_LENGTHS`` tokens: jaxattn's prefill kernel) and decode (one new token
per sequence over ``PROFILE_DECODE``'s batch x context, shuffled 16-token pages as
``benchmarks/decode.py`` builds them: jaxattn's main decode kernel, not its split-KV combine,
against cuDNN's first kernel of a contiguous cache). The clocks are left as
found (``--clock-control none``: the card is shared, and locking its clocks is not ours to
do), so both kernels run at whatever clock the card holds; ncu's replay of one launch
stays well under the power limit, unlike the back-to-back repetitions of
``benchmarks/prefill.py``.

Reported per kernel: time, SM clock, cycles, the fraction of those cycles the SMs were
busy (the rest is the tail of the persistent grid), tensor-pipe utilisation, executed
instructions, register spills, L2 hit rate, DRAM traffic and the warp-stall mix (cycles a
warp spends stalled per issued instruction, by reason); for decode, DRAM bytes read against
the K and V bytes the call needs (does a kernel fetch more than its cache?) and the DRAM
throughput as a share of its peak. Writes ``benchmarks/results/attention-profile-<date>.{json,md}``.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import write_json, write_text


def _shapes(env: str, default: str, mode: str) -> list[tuple[str, str]]:
    return [(mode, x) for x in os.environ.get(env, default).split(",") if x]


# (mode, size): a prefill's length, a decode's "<batch>x<context>".
SHAPES = (_shapes("PROFILE_LENGTHS", "32768,8192", "causal")
          + _shapes("PROFILE_DECODE", "", "decode"))
# The first launch whose name matches is profiled.
KERNEL_NAMES = {("jaxattn", "causal"): "regex:^prefill_kernel_mosaic_gpu",
                ("jaxattn", "decode"): "regex:^decode_kernel_mosaic_gpu",
                ("cudnn", "causal"): "regex:sdpa|fmha|flash",
                ("cudnn", "decode"): "regex:sdpa|fmha|flash"}
METRICS = {
    "time": "gpu__time_duration.sum",
    "sm_clock": "gpc__cycles_elapsed.max.per_second",
    "cycles": "gpc__cycles_elapsed.max",
    "sm_active_cycles": "sm__cycles_active.avg",
    "tensor_pipe_pct_of_elapsed": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "tensor_pipe_pct_of_active": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "bf16_flop_per_s": "sm__ops_path_tensor_op_hgmma_src_bf16_dst_fp32_sparsity_off.sum.per_second",
    "instructions": "smsp__inst_executed.sum",
    "spill_requests": "derived__local_spilling_requests",
    "registers_per_thread": "launch__registers_per_thread",
    "l2_hit_pct": "lts__t_sector_hit_rate.pct",
    "dram_read": "dram__bytes_read.sum",
    "dram_write": "dram__bytes_write.sum",
    "dram_pct_of_peak": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
}
STALLS = ("long_scoreboard", "barrier", "wait", "short_scoreboard", "dispatch_stall",
          "not_selected", "gmma", "math_pipe_throttle", "mio_throttle")


def log(*a):
    print(*a, flush=True)


def _decode_size(size: str) -> tuple[int, int]:
    batch, ctx = (int(x) for x in size.split("x"))
    return batch, ctx


def target(impl: str, mode: str, size: str) -> None:
    """What ncu runs: one call of one implementation (ncu profiles its kernel's first launch)."""
    import jax
    import jax.numpy as jnp

    if mode == "decode":
        from benchmarks import decode

        batch, ctx = _decode_size(size)
        q, k, v = decode.contiguous(batch, ctx)
        if impl == "cudnn":
            lens = jnp.full((batch,), ctx, jnp.int32)
            jax.block_until_ready(decode.dpa("cudnn")(q, k, v, lens))
            return
        kp, vp, table = decode.paged(k, v, 16)
        _, main_only, *_ = decode.jaxattn_fns(batch, ctx, q, kp, vp, table, 16,
                                              decode.decode.default_config())
        jax.block_until_ready(main_only())
        return
    from benchmarks import prefill

    q, k, v = prefill._inputs(int(size), jnp.bfloat16)
    f = prefill.jaxattn_fn(None) if impl == "jaxattn" else prefill.cudnn_fn(False)
    jax.block_until_ready(f(q, k, v))


def _ncu() -> str | None:
    return shutil.which("ncu") or next(
        (p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)


def _parse_raw(text: str) -> dict:
    """ncu --page raw --csv: a header row, a units row, one row per profiled kernel."""
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"'):])))
    header, units, values = rows[0], rows[1], rows[2]
    return {h: (v, u) for h, u, v in zip(header, units, values)}


def _number(x: str) -> float:
    return float(x.replace(",", ""))


def _bytes(value: float, unit: str) -> float:
    """A byte count in the unit ncu picked for it (decimal prefixes)."""
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}
    if unit not in scale:
        raise ValueError(f"not a byte unit of ncu's: {unit!r}")
    return value * scale[unit]


def profile(ncu: str, impl: str, mode: str, size: str, tmp: str) -> dict:
    rep = os.path.join(tmp, f"{impl}-{mode}-{size}")
    cmd = [ncu, "--clock-control", "none", "-k", KERNEL_NAMES[impl, mode], "--launch-count", "1",
           "--set", "full", "--force-overwrite", "-o", rep,
           sys.executable, "-m", "benchmarks.profile_attention", "--target", impl, mode, size]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not os.path.exists(rep + ".ncu-rep"):
        return dict(error=(run.stdout + run.stderr)[-1500:])
    raw = subprocess.run([ncu, "--import", rep + ".ncu-rep", "--page", "raw", "--csv"],
                         capture_output=True, text=True, check=True).stdout
    m = _parse_raw(raw)
    out = dict(kernel=m["Kernel Name"][0])
    for key, name in METRICS.items():
        if name in m:
            out[key] = _number(m[name][0])
            out[key + "_unit"] = m[name][1]
    out["sm_active_pct"] = 100 * out["sm_active_cycles"] / out["cycles"]
    if mode == "decode" and "dram_read" in out:
        from benchmarks.decode import kv_bytes  # imports jax, but starts no backend here

        out["dram_read_over_kv"] = (_bytes(out["dram_read"], out["dram_read_unit"])
                                    / kv_bytes(*_decode_size(size)))
    out["stalls_per_issue"] = {
        s: _number(m[f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio"][0])
        for s in STALLS if f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" in m}
    return out


def markdown(res: dict) -> str:
    lines = [f"# Attention kernel profile {res['date']} (Nsight Compute, one launch each)", "",
             f"Device: {res['device']}. Clocks as found (`--clock-control none`).", ""]
    for shape in res["shapes"]:
        a, b = shape["jaxattn"], shape["cudnn"]
        lines += [f"## {shape['mode']} {shape['size']}", "", "| metric | jaxattn | cuDNN |",
                  "|---|---|---|"]
        if "error" in a or "error" in b:
            lines += [f"| error | {a.get('error', '')[:200]} | {b.get('error', '')[:200]} |", ""]
            continue
        for key in ("time", "sm_clock", "cycles", "sm_active_pct", "tensor_pipe_pct_of_elapsed",
                    "tensor_pipe_pct_of_active", "bf16_flop_per_s", "instructions",
                    "spill_requests", "registers_per_thread", "l2_hit_pct", "dram_read",
                    "dram_write", "dram_pct_of_peak", "dram_read_over_kv"):
            if key not in a or key not in b:
                continue
            unit = a.get(key + "_unit", "")
            fmt = (lambda x: f"{x / 1e12:.0f} T") if key == "bf16_flop_per_s" else (
                lambda x: f"{x:,.0f}" if x >= 1000 else f"{x:.4g}")
            lines.append(f"| {key} {'(' + unit + ')' if unit and key != 'bf16_flop_per_s' else ''} "
                         f"| {fmt(a[key])} | {fmt(b[key])} |")
        for s in STALLS:
            lines.append(f"| stall {s} (cycles per issued instruction) | "
                         f"{a['stalls_per_issue'].get(s, 0):.2f} | {b['stalls_per_issue'].get(s, 0):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--target":
        target(*sys.argv[2:])
        return 0
    ncu = _ncu()
    if ncu is None:
        log("ncu not found: nothing to profile")
        return 1
    device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    res = dict(date=datetime.date.today().isoformat(), device=device, ncu=ncu, shapes=[])
    with tempfile.TemporaryDirectory() as tmp:
        for mode, size in SHAPES:
            shape = dict(mode=mode, size=size)
            for impl in ("jaxattn", "cudnn"):
                shape[impl] = profile(ncu, impl, mode, size, tmp)
                log(mode, size, impl, {k: v for k, v in shape[impl].items() if not k.endswith("_unit")})
            res["shapes"].append(shape)
            _write(res)  # after each shape: a cut-off run keeps what it measured
    log(markdown(res))
    return 0


def _write(res: dict) -> None:
    stem = f"attention-profile-{res['date']}{os.environ.get('PROFILE_TAG', '')}"
    write_json(stem + ".json", res)
    write_text(stem + ".md", markdown(res))


if __name__ == "__main__":
    sys.exit(main())
