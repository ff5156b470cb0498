"""FP8 against bf16 for Scout's matmuls on one GPU, same run, interleaved (issue 22).

    python -m benchmarks.fp8_matmul                # grouped (experts) and dense, default shapes
    python -m benchmarks.fp8_matmul --sweep        # + FP8 tile configs at prefill sizes
    python -m benchmarks.fp8_matmul --quick        # fewer shapes and rounds
    python -m benchmarks.fp8_matmul --decode-sweep # only the grouped matmul's decode tiles
                                                   # (and its time over K: fixed + per step)
    python -m benchmarks.fp8_matmul --projections  # only the dense projections at decode:
                                                   # one grouped launch (K split or not)
                                                   # vs XLA's dot per weight
    python -m benchmarks.fp8_matmul --w8a16        # only the by-row launches with the shared
                                                   # expert at decode: FP8 rows vs f16 rows,
                                                   # and the MoE with the SwiGLU in gate/up

1. Routed experts (16 experts, gate/up 5120 -> 8192, down 8192 -> 5120): the Mosaic
   grouped matmul in bf16 against its FP8 form. Prefill sizes (M = 2048..16384 rows
   spread over the experts): TFLOP/s (2 M K N per product). Decode sizes (M = 1..64
   rows, top-1 routing: the experts hit are counted): the weights' bytes read per
   second (GB/s; bf16 reads 2 bytes per weight, FP8 1) and the time ratio, since decode
   is bound by those bytes. FP8 is timed twice: the kernel alone on prequantised rows
   ("kernel") and with the per-token quantisation of the rows that the model runs
   before it ("+quant").
2. Dense products (shared expert 5120 -> 8192 and 8192 -> 5120; attention q/o
   5120 -> 5120, k/v 5120 -> 1024): XLA's bf16 dot against XLA's FP8 dot
   (``kernels.fp8.scaled_matmul``: cuBLASLt on Hopper) with the row quantisation.

Every shape runs bf16 and FP8 alternately for ``--rounds`` rounds of ``--reps`` calls;
the median round is reported (clock drift hits both alike). Times are the calls' GPU kernel
time (CUPTI): a loop of decode-sized calls would otherwise time the host's dispatch (before
2026-12-01 it did, and bf16 and FP8 measured the same ~60 us at one row). Goals (issue 22): FP8
>= 1.6x bf16's TFLOP/s at prefill sizes, >= 1.8x its speed at decode sizes.
JSON to benchmarks/results/fp8-matmul-DATE.json (and $OUT); a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys

E, H, I = 16, 5120, 8192
EXPERT_SHAPES = {"gate/up": (H, I), "down": (I, H)}
PREFILL_M = (2048, 8192, 16384)
DECODE_M = (1, 8, 32, 64)
DENSE = {"shared gate/up": (H, I), "shared down": (I, H), "attn q/o": (H, H),
         "attn k/v": (H, 1024)}
DENSE_M = (16, 2048, 8192)


# Decode calls hit one of these experts each, in turn (and dense calls one of as many
# weight copies): 4 x Scout's smallest decode weights (21 MB) exceed the H200's 50 MB L2.
HIT_EXPERTS = (3, 7, 11, 15)


def interleaved(fns: dict, args: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed alternately round by round.

    An entry of ``args`` that is a list of argument tuples is a rotation: a timed call runs
    the function once per tuple and counts as that many calls. Each tuple reads other
    weights, so a call finds its weights in HBM, as a model step does, not in the L2 cache
    that a call repeated on the same weights finds a decode-sized weight in (Scout's expert
    and projection weights of 21-42 MB at FP8 fit the H200's 50 MB)."""
    import jax

    from benchmarks.common import gpu_ms, gpu_rounds

    calls, n = {}, {}
    for k, f in fns.items():
        sets = args[k] if isinstance(args[k], list) else [args[k]]
        calls[k] = (jax.jit(lambda sets, f=f: [f(*a) for a in sets]), (tuple(sets),))
        n[k] = len(sets)
    times = gpu_rounds(calls, rounds, measure=lambda f, *a: gpu_ms(f, *a, reps=reps))
    return {k: statistics.median(t) / 1e3 / n[k] for k, t in times.items()}


def _row_experts(real: int):
    """By row, a decode step's 16-row bucket: each row's expert, one int32 [16] per expert e
    of ``HIT_EXPERTS``, the first ``real`` rows on e and every other expert after it (as
    :func:`_hitting` picks them), the rest padding (expert E: none)."""
    import jax.numpy as jnp
    import numpy as np

    out = []
    for e in HIT_EXPERTS:
        groups = np.full(16, E, np.int32)
        groups[:real] = (e + 2 * np.arange(real)) % E
        out.append(jnp.asarray(groups))
    return out


def _hitting(*head, rows: int = 1):
    """Argument tuples ``(*head, group sizes)``, one per expert e of ``HIT_EXPERTS``: one
    row each on expert e and the next ``rows - 1`` of every other one (rows experts hit)."""
    import jax.numpy as jnp

    return [(*head, jnp.zeros((E,), jnp.int32).at[(e + 2 * jnp.arange(rows)) % E].set(1))
            for e in HIT_EXPERTS]


def _fp8_kernel(config=None):
    """The FP8 grouped matmul on prequantised rows: the kernel without the rows'
    quantisation (``config`` None: what ``pick_config`` picks)."""
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import fp8, grouped_matmul as gm

    return jax.jit(lambda xq, xs, w, s, gs: gm.grouped_matmul_fp8(
        fp8.Quantized(xq, xs, jnp.bfloat16), w, s, gs, impl="mosaic", config=config))


def _groups(m: int, rng):
    """Top-1 routing of m tokens: uniform over experts (prefill), random (decode)."""
    import numpy as np

    if m >= 1024:
        sizes = np.full(E, m // E)
        sizes[: m % E] += 1
    else:
        sizes = np.bincount(rng.integers(0, E, m), minlength=E)
    return sizes.astype(np.int32)


def grouped(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    rng = np.random.default_rng(0)
    rows = []
    ms = [(m, "prefill") for m in (PREFILL_M[:2] if args.quick else PREFILL_M)] + \
         [(m, "decode") for m in (DECODE_M[::2] if args.quick else DECODE_M)]
    for name, (k, n) in EXPERT_SHAPES.items():
        w = jax.random.normal(jax.random.key(1), (E, k, n), jnp.bfloat16) / float(np.sqrt(k))  # a numpy scalar would promote to f32
        wq, ws = jax.jit(lambda w: fp8.quantize(jnp.swapaxes(w, 1, 2), -1))(w)
        for m, phase in ms:
            sizes = _groups(m, rng)
            gs = jnp.asarray(sizes)
            cfg = gm.pick_config(m, k, n, fp8=True)
            x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
            xq, xs = jax.jit(fp8.quantize)(x)
            fns = {
                "bf16": jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl="mosaic")),
                "fp8 kernel": _fp8_kernel(),
                "fp8 +quant": jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(
                    x, w, s, gs, impl="mosaic")),
            }
            fargs = {"bf16": (x, w, gs), "fp8 kernel": (xq, xs, wq, ws, gs),
                     "fp8 +quant": (x, wq, ws, gs)}
            if phase == "decode":  # the same rows over other experts in turn: out of L2
                fargs = {v: [(*a[:-1], jnp.roll(gs, e)) for e in HIT_EXPERTS]
                         for v, a in fargs.items()}
            t = interleaved(fns, fargs, args.rounds, args.reps)
            hit = int((sizes > 0).sum())
            flops = 2 * m * k * n
            row = {"matmul": name, "phase": phase, "m": m, "k": k, "n": n, "experts_hit": hit,
                   "config_fp8": dataclasses.asdict(cfg),
                   "us": {v: 1e6 * s for v, s in t.items()},
                   "tflops": {v: flops / s / 1e12 for v, s in t.items()},
                   "weight_gbps": {v: hit * k * n * (2 if v == "bf16" else 1) / s / 1e9
                                   for v, s in t.items()},
                   "speedup_kernel": t["bf16"] / t["fp8 kernel"],
                   "speedup_with_quant": t["bf16"] / t["fp8 +quant"]}
            rows.append(row)
            print(f"{name:8} {phase:7} M={m:>6}: bf16 {row['us']['bf16']:8.1f} us, fp8 kernel "
                  f"{row['us']['fp8 kernel']:8.1f} us (x{row['speedup_kernel']:.2f}), +quant "
                  f"{row['us']['fp8 +quant']:8.1f} us (x{row['speedup_with_quant']:.2f}); "
                  + (f"TFLOP/s {row['tflops']['bf16']:.0f} -> {row['tflops']['fp8 kernel']:.0f}"
                     if phase == "prefill" else
                     f"weights GB/s {row['weight_gbps']['bf16']:.0f} -> "
                     f"{row['weight_gbps']['fp8 kernel']:.0f} ({hit} experts)"), flush=True)
    return rows


def sweep(args) -> list[dict]:
    """FP8 tile configs at prefill sizes (which the picker should choose)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    configs = [gm.GroupedMatmulConfig(block_m=bm, block_n=bn, block_k=128,
                                      max_concurrent_steps=st, grid_block_n=gb)
               for bm, bn in ((128, 128), (64, 256), (128, 256))
               for st in (4, 6) for gb in (1, 8)]
    rows = []
    rng = np.random.default_rng(0)
    for name, (k, n) in EXPERT_SHAPES.items():
        m = 8192
        gs = jnp.asarray(_groups(m, rng))
        wq, ws = jax.jit(lambda w: fp8.quantize(w, -1))(
            jax.random.normal(jax.random.key(1), (E, n, k), jnp.bfloat16))
        xq, xs = jax.jit(fp8.quantize)(jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16))
        for cfg in configs:
            if n % (cfg.block_n * cfg.grid_block_n) and cfg.grid_block_n > 1:
                continue
            try:
                f = _fp8_kernel(cfg)
                t = interleaved({"c": f}, {"c": (xq, xs, wq, ws, gs)}, args.rounds, args.reps)["c"]
            except Exception as e:  # a config over the SMEM or register budget
                print(f"{name} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            tf = 2 * m * k * n / t / 1e12
            rows.append({"matmul": name, "m": m, "config": dataclasses.asdict(cfg), "us": t * 1e6,
                         "tflops": tf})
            print(f"sweep {name:8} M={m} {cfg}: {t * 1e6:8.1f} us, {tf:.0f} TFLOP/s", flush=True)
    return rows


# Scout's expert shapes per device at TP=1 and TP=2 (I split over the devices): (K, N).
DECODE_SHAPES = {"gate/up tp1": (H, I), "down tp1": (I, H), "gate/up tp2": (H, I // 2),
                 "down tp2": (I // 2, H)}


def decode_sweep(args) -> list[dict]:
    """The grouped matmul's tiles at decode size (one token, one expert hit: M = 1), bf16
    and FP8: K splits x ring depth x N tile, against what ``pick_config`` picks (``--quick``:
    the pick alone), and gate and up as one launch against two. Reported as the weights'
    bytes read per second (the bound at these sizes). ``--swap-only``: FP8's pick with K
    unsplit and in 2 and 4, at one row (one expert) and eight (eight experts)."""
    if args.swap_only:
        return _swap_splits(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import common, fp8, grouped_matmul as gm

    rows = []
    for name, (k, n) in DECODE_SHAPES.items():
        w = jax.random.normal(jax.random.key(1), (E, k, n), jnp.bfloat16) / float(np.sqrt(k))
        wq, ws = jax.jit(lambda w: fp8.quantize(jnp.swapaxes(w, 1, 2), -1))(w)
        m = 1  # one expert hit
        x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
        xq, xs = jax.jit(fp8.quantize)(x)
        for dtype in ("bf16", "fp8"):
            bk = 128 if dtype == "fp8" else 64
            picked = gm.pick_config(m, k, n, fp8=dtype == "fp8")
            configs = {picked} if args.quick else {picked} | {
                gm.GroupedMatmulConfig(block_m=64, block_n=bn, block_k=bk,
                                       max_concurrent_steps=st, k_splits=sp)
                for bn in (64, 128, 256) for st in (4, 8) for sp in (1, 2, 4, 8)
                if (k // bk) % sp == 0 and (n // bn) * sp <= 4 * common.num_sms()}
            if dtype == "fp8":  # the swapped form (NOTES-grouped-matmul.md): N and K tiles
                configs = configs | {  # x ring depth
                    gm.GroupedMatmulConfig(block_m=16, block_n=sn, block_k=sk, swap_ab=True,
                                           max_concurrent_steps=st)
                    for sn, sk, st in ((128, 128, 8), (128, 256, 4), (128, 256, 6),
                                       # 32 KiB steps on twice the SMs (not yet timed)
                                       (64, 512, 4), (64, 512, 5))}
            for cfg in sorted(configs, key=lambda c: (c.block_n, c.max_concurrent_steps,
                                                      c.k_splits)):
                if dtype == "fp8":
                    f = _fp8_kernel(cfg)
                    fargs = _hitting(xq, xs, wq, ws)
                else:
                    f = jax.jit(lambda x, w, gs, cfg=cfg: gm.grouped_matmul(
                        x, w, gs, impl="mosaic", config=cfg))
                    fargs = _hitting(x, w)
                try:
                    t = interleaved({"c": f}, {"c": fargs}, args.rounds, args.reps)["c"]
                except Exception as e:  # a config over the SMEM budget
                    print(f"{name} M={m} {dtype} {cfg}: failed: {type(e).__name__}: "
                          f"{str(e)[:160]}", flush=True)
                    continue
                gbps = k * n * (2 if dtype == "bf16" else 1) / t / 1e9
                rows.append({"matmul": name, "m": m, "dtype": dtype, "k": k, "n": n,
                             "config": dataclasses.asdict(cfg), "picked": cfg == picked,
                             "us": t * 1e6, "weight_gbps": gbps})
                print(f"decode {name:11} M={m} {dtype} bn={cfg.block_n:3} bk={cfg.block_k:3} "
                      f"steps={cfg.max_concurrent_steps} splits={cfg.k_splits}"
                      f"{' swap_ab' if cfg.swap_ab else ''}"
                      f"{' (picked)' if cfg == picked else ''}: {t * 1e6:7.1f} us, "
                      f"{gbps:6.0f} GB/s", flush=True)
            picks = {r["dtype"]: r["us"] for r in rows if r["matmul"] == name and r["picked"]}
            if len(picks) == 2 and dtype == "fp8":
                print(f"decode {name:11} picked FP8 vs picked bf16 (same run): "
                      f"{picks['bf16'] / picks['fp8']:.2f}x the speed", flush=True)
            if name.startswith("gate/up"):
                rows.append(_gate_and_up(args, name, dtype, x, w, wq, ws))
    return rows + _k_scan(args)


# W8A16's by-row launches with the shared expert: (block_n, block_k, ring slots) that fit
# shared memory beside the pick's (128, 256, 5); --w8a16 --tiles times them.
W8A16_TILES = ((64, 256, 8), (64, 512, 4), (128, 512, 2))
BY_ROW_CONFIGS = {  # (block_n, block_k, ring slots) of the by-row form beside the pick
    "n64_k512_s4": (64, 512, 4), "n128_k512_s3": (128, 512, 3)}


def by_row_sweep(args) -> list[dict]:
    """The by-row FP8 form as a decode step calls it: a 16-row bucket with 1 or 8 real rows
    (the rest of no expert), gate/up (5120 -> 2 x 8192) and down (8192 -> 5120) at TP=1,
    the pick against ``BY_ROW_CONFIGS``, cold L2 (a rotation over ``HIT_EXPERTS``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    rows = []
    for name, (k, n) in {"gate/up tp1": (H, 2 * I), "down tp1": (I, H)}.items():
        wq, ws = jax.jit(lambda w: fp8.quantize(w, -1))(
            jax.random.normal(jax.random.key(1), (E, n, k), jnp.bfloat16) / float(np.sqrt(k)))
        xq = fp8.Quantized.of(jax.random.normal(jax.random.key(2), (16, k), jnp.bfloat16))
        configs = {"pick": gm.pick_config(16, k, n, fp8=True)} | {
            c: gm.GroupedMatmulConfig(block_m=16, block_n=bn, block_k=bk, swap_ab=True,
                                      max_concurrent_steps=st)
            for c, (bn, bk, st) in BY_ROW_CONFIGS.items()}
        fns = {c: jax.jit(lambda v, s, w, sc, g, cfg=cfg: gm._fp8_launch(
            fp8.Quantized(v, s, jnp.bfloat16), (w,), (sc,), g, cfg, jnp.bfloat16, True,
            by_row=True)) for c, cfg in configs.items()}
        for real in (1, 8):
            rotation = [(xq.values, xq.scale, wq, ws, g) for g in _row_experts(real)]
            t = interleaved(fns, {c: rotation for c in fns}, args.rounds, args.reps)
            for c, sec in t.items():
                tbs = k * n * real / sec / 1e12
                rows.append({"matmul": name, "real_rows": real, "config": c,
                             **dataclasses.asdict(configs[c]), "us": sec * 1e6, "weight_tbs": tbs})
                print(f"by-row {name:11} rows={real} {c:13} {sec * 1e6:7.2f} us "
                      f"{tbs:5.2f} TB/s", flush=True)
    return rows


def w8a16(args) -> list[dict]:
    """A decode step's by-row launches with the shared expert (a 16-row bucket with 1 or 8
    real rows; gate/up 5120 -> 2 x 8192, down 8192 -> 5120, TP=1), FP8 rows (W8A8, the
    model's form) against the same rows in f16 (W8A16: the weight tiles widened to f16 in
    registers), cold L2 (a rotation over ``HIT_EXPERTS``). f16 rows need no per-token
    scale, which is what would let the gate/up launch's epilogue form the SwiGLU and drop
    the launch that quantises it (NOTES-fp8.md, session 42); this asks what widening costs
    the launch. ``rel_diff``: the f16 rows' product against the FP8 rows' (the rows'
    quantisation, ~2-4% relative)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    rows = []
    for name, (k, ns) in {"gate/up+shared": (H, (I, I)), "down+shared": (I, (H,))}.items():
        quantize = jax.jit(lambda w: fp8.quantize(w, -1))
        routed = [quantize(jax.random.normal(jax.random.key(i), (E, n, k), jnp.bfloat16)
                           / float(np.sqrt(k))) for i, n in enumerate(ns)]
        shared = [quantize(jax.random.normal(jax.random.key(10 + i), (1, n, k), jnp.bfloat16)
                           / float(np.sqrt(k))) for i, n in enumerate(ns)]
        parts = tuple(w for w, _ in routed + shared)
        scales = tuple(s for _, s in routed + shared)
        x16 = jax.random.normal(jax.random.key(3), (32, k), jnp.float16)  # routed, then shared
        xq = fp8.Quantized.of(x16.astype(jnp.bfloat16))
        lhs = {"W8A8": xq.values, "W8A16": x16}
        # The FP8 rows' product is in units of their scales; the f16 rows' is the product.
        unit = {"W8A8": np.asarray(xq.scale, np.float32)[:, None], "W8A16": np.ones((32, 1))}
        fns, forms = {}, [("W8A8", False, None), ("W8A16", True, None)]
        if args.tiles:  # W8A16 with other tiles (block_n, block_k, ring slots) beside the pick
            forms += [(f"W8A16 n{bn} k{bk} s{st}", True, (bn, bk, st))
                      for bn, bk, st in W8A16_TILES]
        for form, f16, tiles in forms:
            cfg = dataclasses.replace(gm.pick_config(16, k, sum(ns), fp8=True, f16_rows=f16),
                                      block_m=16)
            if tiles:
                cfg = dataclasses.replace(cfg, block_n=tiles[0], block_k=tiles[1],
                                          max_concurrent_steps=tiles[2])
            fns[form] = jax.jit(lambda x, g, w, sc, cfg=cfg: gm._mosaic_grouped_matmul(
                x, w, g, sc, config=cfg, by_row=True, shared_blocks=(0, 1),
                out_dtype=jnp.bfloat16))
        lhs.update({form: x16 for form, f16, tiles in forms if tiles})
        unit.update({form: unit["W8A16"] for form, f16, tiles in forms if tiles})
        for real in (1, 8):
            rotation = {form: [(lhs[form], g, parts, scales) for g in _row_experts(real)]
                        for form in fns}
            held = list(range(real)) + list(range(16, 32))  # routed rows held, all shared
            out = {form: np.asarray(f(*rotation[form][0]), np.float32)[held] * unit[form][held]
                   for form, f in fns.items()}
            rel = float(np.linalg.norm(out["W8A16"] - out["W8A8"]) / np.linalg.norm(out["W8A8"]))
            for form in out:  # other tiles, one product: the same sums in another order
                if form.startswith("W8A16 "):
                    np.testing.assert_allclose(out[form], out["W8A16"], rtol=2e-2, atol=2e-2)
            t = interleaved(fns, rotation, args.rounds, args.reps)
            weight_bytes = (real + 1) * k * sum(ns)
            for form, sec in t.items():
                rows.append({"matmul": name, "real_rows": real, "form": form, "us": sec * 1e6,
                             "weight_tbs": weight_bytes / sec / 1e12, "rel_diff": rel})
                print(f"w8a16 {name:15} rows={real} {form:6} {sec * 1e6:7.2f} us "
                      f"{weight_bytes / sec / 1e12:5.2f} TB/s (rel diff {rel:.3f})", flush=True)
    return rows + _moe_chains(args)


def _moe_chains(args) -> list[dict]:
    """A decode step's whole routed + shared MoE (16-row bucket, 1 or 8 experts hit, cold
    L2), as ``llama4.moe.SWIGLU_IN_GATE_UP`` picks it: off, gate/up's product, the SwiGLU
    and quantise kernel, down on FP8 rows (three launches); on, gate/up forming the SwiGLU,
    down on its f16 rows (two). Kernel time of the chain; ``rel_diff``: on against off."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, fp8_rows, grouped_matmul as gm

    quantize = jax.jit(lambda w: fp8.quantize(w, -1))
    rand = lambda i, shape: jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) / float(
        np.sqrt(shape[-1]))
    routed = [quantize(rand(i, (E, n, k))) for i, (n, k) in enumerate(((I, H), (I, H), (H, I)))]
    shared = [quantize(rand(10 + i, (n, k))) for i, (n, k) in enumerate(((I, H), (I, H), (H, I)))]
    x = fp8.Quantized.of(jax.random.normal(jax.random.key(3), (16, H), jnp.bfloat16))

    def chain(fused, x, groups, routed, shared):
        (g, gs), (u, us), (d, ds) = routed
        (sg, sgs), (su, sus), (sd, sds) = shared
        up = dict(impl="mosaic", shared=((sg, su), (sgs, sus)))
        down = dict(impl="mosaic", shared=((sd,), (sds,)), defer=True)
        if fused:
            h = gm.grouped_matmul_fp8_by_row(x, (g, u), (gs, us), groups, swiglu=True, **up)
        else:
            gate_up = gm.grouped_matmul_fp8_by_row(x, (g, u), (gs, us), groups,
                                                   scale_rows=False, **up)
            h = fp8_rows.swiglu_quantize(gate_up.reshape(32, -1), None, x.scale)
        return gm.grouped_matmul_fp8_by_row(h, (d,), (ds,), groups, **down).resolve()

    fns = {"3 launches (FP8 rows)": jax.jit(lambda *a: chain(False, *a)),
           "2 launches (SwiGLU in gate/up, W8A16 down)": jax.jit(lambda *a: chain(True, *a))}
    rows = []
    for real in (1, 8):
        scale = jnp.where(jnp.arange(16) < real, x.scale, 0.0)  # padding rows: scale 0
        xr = fp8.Quantized(x.values, jnp.concatenate([scale, x.scale]), x.dtype)
        rotation = [(xr, g, routed, shared) for g in _row_experts(real)]
        outs = [np.asarray(f(*rotation[0]), np.float32)[:real] for f in fns.values()]
        rel = float(np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]))
        t = interleaved(fns, {c: rotation for c in fns}, args.rounds, args.reps)
        for form, sec in t.items():
            rows.append({"matmul": "MoE chain", "real_rows": real, "form": form,
                         "us": sec * 1e6, "rel_diff": rel})
            print(f"w8a16 MoE chain rows={real} {form:42} {sec * 1e6:7.2f} us "
                  f"(rel diff {rel:.3f})", flush=True)
    return rows


def _swap_splits(args) -> list[dict]:
    """FP8's picked decode tiles with K in 1, 2 and 4 splits, at 1 and 8 rows (as many
    experts hit: the K split's extra work items and partial sums grow with them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    rows = []
    for name, (k, n) in DECODE_SHAPES.items():
        w = jax.random.normal(jax.random.key(1), (E, k, n), jnp.bfloat16) / float(np.sqrt(k))
        wq, ws = jax.jit(lambda w: fp8.quantize(jnp.swapaxes(w, 1, 2), -1))(w)
        for m in (1, 8):
            xq, xs = jax.jit(fp8.quantize)(jax.random.normal(jax.random.key(2), (m, k),
                                                             jnp.bfloat16))
            picked = gm.pick_config(m, k, n, fp8=True)
            fns = {s: _fp8_kernel(dataclasses.replace(picked, k_splits=s)) for s in (1, 2, 4)}
            t = interleaved(fns, {s: _hitting(xq, xs, wq, ws, rows=m) for s in fns},
                            args.rounds, args.reps)
            rows.append({"matmul": name, "m": m, "k": k, "n": n,
                         "config": dataclasses.asdict(picked),
                         **{f"k_splits_{s}_us": t[s] * 1e6 for s in fns}})
            print(f"decode {name:11} M={m} fp8 picked (k_splits={picked.k_splits}), K in 1 / "
                  f"2 / 4 splits: " + " / ".join(f"{t[s] * 1e6:5.1f}" for s in fns) + " us "
                  f"({k * n * min(m, E) / t[1] / 1e9:5.0f} GB/s unsplit)", flush=True)
    return rows


def _k_scan(args, ks=(1024, 2048, 4096, 8192), n=I) -> list[dict]:
    """Where a decode call's time goes: the picked config at M = 1 over K (one expert hit,
    N = 8192), bf16, FP8 and FP8's 64-row tile (the pick before swap-AB), fitted as
    ``fixed + K * per_k``; cuBLAS's FP8 dot on the same prequantised weights (16 rows, as a
    decode bucket) beside it. A large ``fixed`` is time no K step accounts for (launch,
    prologue, epilogue, the group lookup)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxattn.kernels import fp8, grouped_matmul as gm

    tile64 = gm.GroupedMatmulConfig(block_m=64, block_k=128, max_concurrent_steps=8)
    times: dict[str, list[float]] = {"bf16": [], "fp8": [], "fp8 64-row": [], "cublas fp8": []}
    for k in ks:
        w = jax.random.normal(jax.random.key(1), (E, k, n), jnp.bfloat16) / float(np.sqrt(k))
        wq, ws = jax.jit(lambda w: fp8.quantize(jnp.swapaxes(w, 1, 2), -1))(w)
        x = jax.random.normal(jax.random.key(2), (16, k), jnp.bfloat16)
        xq, xs = jax.jit(fp8.quantize)(x)
        fns = {
            "bf16": jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl="mosaic")),
            "fp8": _fp8_kernel(),
            "fp8 64-row": _fp8_kernel(tile64),
            "cublas fp8": jax.jit(lambda xq, w: jax.lax.dot_general(
                xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)),
        }
        fargs = {"bf16": _hitting(x[:1], w), "fp8": _hitting(xq[:1], xs[:1], wq, ws),
                 "fp8 64-row": _hitting(xq[:1], xs[:1], wq, ws),
                 "cublas fp8": [(xq, wq[e]) for e in HIT_EXPERTS]}
        t = interleaved(fns, fargs, args.rounds, args.reps)
        for name in times:
            times[name].append(t[name] * 1e6)
        print(f"decode K scan K={k:5} N={n}: " + ", ".join(
            f"{name} {t[name] * 1e6:6.1f} us" for name in times), flush=True)
    rows = []
    for name, us in times.items():
        per_k, fixed = np.polyfit(np.asarray(ks, float), np.asarray(us), 1)
        bytes_per_k = n * (2 if name == "bf16" else 1)
        rows.append({"k_scan": name, "n": n, "ks": list(ks), "us": us,
                     "fixed_us": float(fixed), "per_k_us": float(per_k),
                     "marginal_gbps": bytes_per_k / (per_k * 1e-6) / 1e9})
        print(f"decode K scan {name:10}: {fixed:5.1f} us fixed + {per_k * 1e3:6.2f} us per 1k "
              f"of K ({rows[-1]['marginal_gbps']:5.0f} GB/s at the margin)", flush=True)
    return rows


# Scout's dense FP8 projections per device at TP=1 and TP=2: (K, N per weight); several
# weights share their input (one launch).
PROJECTIONS = {"q/k/v tp1": (H, (5120, 1024, 1024)), "q/k/v tp2": (H, (2560, 512, 512)),
               "shared gate/up tp1": (H, (8192, 8192)), "shared gate/up tp2": (H, (4096, 4096)),
               "o tp1": (5120, (H,)), "o tp2": (2560, (H,)),
               "shared down tp1": (8192, (H,)), "shared down tp2": (4096, (H,))}


def projections(args) -> list[dict]:
    """Dense FP8 projections at decode sizes: one launch of the grouped kernel
    (``grouped_matmul.dense_fp8``, K split as ``dense_config`` picks, unsplit, and in 4)
    against XLA's FP8 dot per weight (cuBLASLt), on prequantised rows."""
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import fp8, grouped_matmul as gm

    rows = []
    for name, (k, ns) in PROJECTIONS.items():
        copies = [tuple(zip(*(jax.jit(fp8.quantize)(jax.random.normal(
            jax.random.key(10 * c + i), (n, k), jnp.bfloat16) / 70) for i, n in enumerate(ns))))
            for c in range(len(HIT_EXPERTS))]  # [(ws, ss)]: a rotation (interleaved)
        for m in (1, 16):
            x = fp8.Quantized.of(jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16))
            config = gm.dense_config(m, k, sum(ns))
            picked, splits = config.k_splits, {"pick": None, "k1": 1, "k4": 4}
            if k // config.block_k % 4:
                del splits["k4"]
            fns = {f"mosaic {v}": jax.jit(lambda x, ws, ss, s=s: gm.dense_fp8(
                x, ws, ss, impl="mosaic", k_splits=s)) for v, s in splits.items()}
            # Half-width N tiles instead of a K split: as many work items, no partial sums
            # for XLA to add after the kernel (two small kernels a layer in the step).
            for stages in (6, 10):
                narrow = dataclasses.replace(gm.dense_config(m, k, sum(ns), 1), block_n=64,
                                             max_concurrent_steps=stages)
                fns[f"mosaic k1 n64 s{stages}"] = jax.jit(
                    lambda x, ws, ss, c=narrow: gm.dense_fp8(x, ws, ss, impl="mosaic", config=c))
            fns["xla"] = jax.jit(lambda x, ws, ss: gm.dense_fp8(x, ws, ss, impl="xla"))
            t = interleaved(fns, {impl: [(x, *c) for c in copies] for impl in fns},
                            args.rounds, args.reps)
            gbps = sum(ns) * k / t["mosaic pick"] / 1e9
            rows.append({"projections": name, "m": m, "ns": list(ns), "k": k,
                         "picked_k_splits": picked,
                         **{f"{v.replace(' ', '_')}_us": t[v] * 1e6 for v in fns},
                         "speedup": t["xla"] / t["mosaic pick"], "pick_weight_gbps": gbps})
            others = ", ".join(f"{v} {t[v] * 1e6:5.1f}" for v in fns if v != "mosaic pick")
            print(f"projections {name:18} M={m:2}: one launch (k_splits={picked}) "
                  f"{t['mosaic pick'] * 1e6:5.1f} us ({gbps:5.0f} GB/s), {others} us: "
                  f"{rows[-1]['speedup']:.2f}x XLA", flush=True)
    return rows


def _gate_and_up(args, name, dtype, x, w, wq, ws) -> dict:
    """An expert's gate and up products as one launch (the model's) against two launches
    (up: the weights of the expert before, so the two parts read different bytes)."""
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import grouped_matmul as gm

    if dtype == "fp8":
        one = jax.jit(lambda x, a, b, sa, sb, gs: gm.grouped_matmul_fp8(
            x, (a, b), (sa, sb), gs, impl="mosaic"))
        two = jax.jit(lambda x, a, b, sa, sb, gs: (
            gm.grouped_matmul_fp8(x, a, sa, gs, impl="mosaic"),
            gm.grouped_matmul_fp8(x, b, sb, gs, impl="mosaic")))
        fargs = _hitting(x, wq, jnp.roll(wq, 1, 0), ws, jnp.roll(ws, 1, 0))
    else:
        one = jax.jit(lambda x, a, b, gs: gm.grouped_matmul(x, (a, b), gs, impl="mosaic"))
        two = jax.jit(lambda x, a, b, gs: (gm.grouped_matmul(x, a, gs, impl="mosaic"),
                                           gm.grouped_matmul(x, b, gs, impl="mosaic")))
        fargs = _hitting(x, w, jnp.roll(w, 1, 0))
    t = interleaved({"one": one, "two": two}, {"one": fargs, "two": fargs}, args.rounds,
                    args.reps)
    print(f"decode {name:11} {dtype} gate+up: one launch {t['one'] * 1e6:7.1f} us, two "
          f"launches {t['two'] * 1e6:7.1f} us", flush=True)
    return {"matmul": name + " gate+up", "dtype": dtype, "one_launch_us": t["one"] * 1e6,
            "two_launches_us": t["two"] * 1e6}


def dense(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import fp8

    rows = []
    for name, (k, n) in DENSE.items():
        w = jax.random.normal(jax.random.key(3), (n, k), jnp.bfloat16) / 70
        wq, ws = jax.jit(fp8.quantize)(w)
        for m in (DENSE_M[1:] if args.quick else DENSE_M):
            x = jax.random.normal(jax.random.key(4), (m, k), jnp.bfloat16)
            fns = {"bf16": jax.jit(lambda x, w: jax.lax.dot_general(
                       x, w, (((1,), (1,)), ((), ())))),
                   "fp8 +quant": jax.jit(fp8.scaled_matmul)}
            t = interleaved(fns, {"bf16": (x, w), "fp8 +quant": (x, wq, ws)}, args.rounds,
                            args.reps)
            row = {"matmul": name, "m": m, "k": k, "n": n,
                   "us": {v: 1e6 * s for v, s in t.items()},
                   "tflops": {v: 2 * m * k * n / s / 1e12 for v, s in t.items()},
                   "speedup": t["bf16"] / t["fp8 +quant"]}
            rows.append(row)
            print(f"dense {name:14} M={m:>5}: bf16 {row['us']['bf16']:7.1f} us, fp8 "
                  f"{row['us']['fp8 +quant']:7.1f} us (x{row['speedup']:.2f})", flush=True)
    return rows


def table(res: dict) -> str:
    lines = ["| matmul | phase | M | experts hit | bf16 us | FP8 kernel us | FP8 +quant us | "
             "speedup (kernel / +quant) | bf16 -> FP8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["grouped"]:
        unit = (f"{r['tflops']['bf16']:.0f} -> {r['tflops']['fp8 kernel']:.0f} TFLOP/s"
                if r["phase"] == "prefill" else
                f"{r['weight_gbps']['bf16']:.0f} -> {r['weight_gbps']['fp8 kernel']:.0f} GB/s")
        lines.append(f"| {r['matmul']} | {r['phase']} | {r['m']} | {r['experts_hit']} | "
                     f"{r['us']['bf16']:.1f} | {r['us']['fp8 kernel']:.1f} | "
                     f"{r['us']['fp8 +quant']:.1f} | {r['speedup_kernel']:.2f} / "
                     f"{r['speedup_with_quant']:.2f} | {unit} |")
    if res.get("dense"):
        lines += ["", "| dense | M | bf16 us | FP8 +quant us | speedup |", "|---|---|---|---|---|"]
        for r in res["dense"]:
            lines.append(f"| {r['matmul']} | {r['m']} | {r['us']['bf16']:.1f} | "
                         f"{r['us']['fp8 +quant']:.1f} | {r['speedup']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8_matmul", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also FP8 tile configs at M=8192")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--decode-sweep", action="store_true",
                   help="only the grouped matmul's tiles at decode sizes")
    p.add_argument("--projections", action="store_true",
                   help="only the dense projections at decode: one launch vs XLA per weight")
    p.add_argument("--by-row", action="store_true",
                   help="only the by-row form at a decode step's 16-row bucket: the pick "
                        "against BY_ROW_CONFIGS")
    p.add_argument("--w8a16", action="store_true",
                   help="only the by-row launches with the shared expert at decode: FP8 rows "
                        "against f16 rows (the weights widened in registers)")
    p.add_argument("--tiles", action="store_true",
                   help="with --w8a16: the f16 rows' launches with W8A16_TILES too")
    p.add_argument("--swap-only", action="store_true",
                   help="with --decode-sweep: FP8 only, the pick with K in 1, 2 and 4 splits")
    args = p.parse_args(argv)
    import jax

    from benchmarks.common import time_kernels_alone, write_json

    time_kernels_alone()
    from jaxattn.kernels import common

    if not common.on_hopper():
        print("needs a Hopper GPU (the Mosaic kernels)", file=sys.stderr)
        return 2
    res = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "rounds": args.rounds, "reps": args.reps}
    for mode, run, stem in (("projections", projections, "fp8-projections"),
                            ("by_row", by_row_sweep, "gmm-by-row-sweep"),
                            ("w8a16", w8a16, "gmm-w8a16"),
                            ("decode_sweep", decode_sweep, "gmm-decode-sweep")):
        if getattr(args, mode):  # a mode of its own: its results alone
            res[mode] = run(args)
            print("wrote", write_json(f"{stem}-{res['date']}.json", res))
            return 0
    res["grouped"] = grouped(args)
    if not args.no_dense:
        res["dense"] = dense(args)
    if args.sweep:
        res["sweep"] = sweep(args)
    print(table(res))
    print("wrote", write_json(f"fp8-matmul-{res['date']}.json", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
