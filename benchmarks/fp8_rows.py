"""The fused row kernels (``kernels/fp8_rows.py``) against the XLA fusions they replace.

    python -m benchmarks.fp8_rows            # Scout's decode rows, one H200

For each call a decode step of full-size Scout makes per layer (16 rows: the smallest
token bucket; hidden 5120, intermediate 8192, and TP=2's 4096 halves) the Mosaic kernel
and the XLA composition (for the routing norm: the step's default, the norm's kernel then
``route_scales``) run alternately for ``--rounds`` rounds; each round's time is the
call's GPU kernel time (CUPTI; the order of the two alternates), and the XLA path's kernel
count is reported beside it.
Kernel time leaves out what a launch costs between kernels inside a CUDA graph (~1 us
each, the fused kernels' other saving), so a tie here is a win in the step.
JSON to benchmarks/results/fp8-rows-DATE.json; a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

ROWS = 16


def cases():
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import fp8
    from jaxattn.kernels import fp8_rows as fr

    key = iter(jax.random.split(jax.random.key(0), 12))
    x = jax.random.normal(next(key), (ROWS, 5120), jnp.bfloat16)
    w = jax.random.uniform(next(key), (5120,), jnp.bfloat16, 0.5, 1.5)
    gu = jax.random.normal(next(key), (ROWS, 16384), jnp.bfloat16)
    g2, u2 = (jax.random.normal(next(key), (ROWS, 4096), jnp.bfloat16) for _ in range(2))
    rs = jnp.exp(jax.random.normal(next(key), (ROWS,)))
    delta = jax.random.normal(next(key), (ROWS, 5120), jnp.bfloat16)
    # A feed-forward update as the FP8 decode step hands it on: the shared expert's down
    # projection unscaled (f32, row and column scales), the routed experts' (bf16, row
    # scales; one token, the 15 padding rows' scales zeroed).
    shared = fp8.Unscaled(jax.random.normal(next(key), (ROWS, 5120)) * 100,
                          jnp.exp(jax.random.normal(next(key), (ROWS,))) * 1e-3,
                          jnp.exp(jax.random.normal(next(key), (5120,))) * 1e-2, jnp.bfloat16)
    routed = fp8.mask_rows(fp8.Unscaled(delta, rs, None, jnp.bfloat16), jnp.arange(ROWS) < 1)
    router = jax.random.normal(next(key), (16, 5120), jnp.bfloat16) * 0.02

    def routing_norm(joint: bool):  # the routing norm's kernel, its expert sums either way
        config = fr.RowsConfig(joint_router_sums=joint)
        return lambda impl: lambda x, t, w, r: fr.add_rms_norm_quantize(
            x, t, w, 1e-5, router=r, impl=impl, config=config)

    return {
        "quantize 5120 (o_proj input)": (lambda impl: lambda x: fr.quantize(x, impl=impl), (x,)),
        "rms_norm + quantize 5120": (
            lambda impl: lambda x, w: fr.rms_norm_quantize(x, w, 1e-5, impl=impl), (x, w)),
        "residual add + rms_norm + quantize 5120": (
            lambda impl: lambda x, d, w: fr.add_rms_norm_quantize(x, d, w, 1e-5, impl=impl),
            (x, delta, w)),
        "the experts' epilogues and sum + residual add + rms_norm + quantize 5120": (
            lambda impl: lambda x, t, w: fr.add_rms_norm_quantize(x, t, w, 1e-5, impl=impl),
            (x, (shared, routed), w)),
        # The expert sums one at a time (RowsConfig.joint_router_sums off; before session 61's
        # default), then in one crossing (the default; its "xla" column: as above).
        "o_proj's epilogue + residual add + rms_norm + quantize + top-1 of 16 experts and "
        "the rows' scales 5120": (routing_norm(False), (x, (shared,), w, router)),
        "the same, the experts' sums in one crossing 5120": (
            routing_norm(True), (x, (shared,), w, router)),
        # The decode step's routing with ROUTE_IN_NORM off: the norm's kernel, then the
        # router's XLA reduction and the routing kernel. (Its "xla" column.)
        "residual add + rms_norm + quantize, then route_scales, against all in the norm's "
        "kernel 5120": (
            lambda impl: (lambda x, t, w, r: fr.add_rms_norm_quantize(
                x, t, w, 1e-5, router=r, impl="mosaic")) if impl == "mosaic" else _norm_then_route,
            (x, (shared,), w, router)),
        "swiglu + quantize 2x8192, row scales (routed)": (
            lambda impl: lambda g, r: fr.swiglu_quantize(g, None, r, impl=impl), (gu, rs)),
        "swiglu + quantize 4096 (shared, TP=2)": (
            lambda impl: lambda g, u: fr.swiglu_quantize(g, u, impl=impl), (g2, u2)),
    }


def _norm_then_route(x, terms, w, router):
    from jaxattn.kernels import fp8_rows as fr

    total, h, q = fr.add_rms_norm_quantize(x, terms, w, 1e-5, impl="mosaic")
    return total, h, q, fr.route_scales(h, router, q.scale, impl="mosaic")


def kernel_count(f, args) -> int:
    """Kernels one call launches: the fusions and custom calls of its compiled entry
    computation (static; a profiler trace beside CUPTI timing aborted the process)."""
    import re

    text = f.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = .*?\b(?:fusion|custom-call)\(", entry, re.M))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    import jax

    from benchmarks.common import gpu_ms, gpu_rounds, time_kernels_alone, write_json

    time_kernels_alone()

    rows = []
    for name, (make, fargs) in cases().items():
        fns = {impl: jax.jit(make(impl)) for impl in ("mosaic", "xla")}
        times = gpu_rounds({impl: (f, fargs) for impl, f in fns.items()}, args.rounds,
                           measure=lambda f, *a: gpu_ms(f, *a, reps=args.reps) * 1e3)
        us = {impl: statistics.median(t) for impl, t in times.items()}
        kernels = {impl: kernel_count(f, fargs) for impl, f in fns.items()}
        rows.append({"call": name, "rows": ROWS, "us": us, "kernels": kernels})
        print(f"{name:48} fused {us['mosaic']:6.2f} us ({kernels['mosaic']} kernel), "
              f"XLA {us['xla']:6.2f} us ({kernels['xla']} kernels)", flush=True)
    date = datetime.date.today().isoformat()
    res = {"date": date, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "rows": rows}
    print("wrote", write_json(f"fp8-rows-{date}.json", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
