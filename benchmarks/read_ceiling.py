"""How fast HBM can be read in the decode kernel's form: one producer warpgroup a CTA copying
K and V blocks by TMA into a ring of shared-memory slots, one consumer warpgroup releasing
them, and nothing else (no math). Beside it, XLA's sum over the same bytes (the "read-only"
ceiling the decode benchmark reports).

The question it answers (benchmarks/NOTES-decode.md, sessions 53-58): the decode kernel reads
its cache ~1-3% slower than cuDNN's kernel over the same bytes. Is that the form of its reads
(one CTA an SM, a 2-deep ring of 128-key blocks, 8 copies a block over 16-token pages or one
over pages in order), which this kernel has too, or the work between them, which it has not?

    python -m benchmarks.read_ceiling           # 1.07 GB: 32 x 8k keys of Scout's 8 KV heads

Each form is timed by GPU time (CUPTI), the forms interleaved over rounds; TB/s = bytes / time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.common import gpu_rounds, write_report
from benchmarks.roofline import read_bandwidth

HKV, D = 8, 128


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One read form. tiles: CTAs, each a (span of keys, KV head) tile as the decode kernel's
    (consecutive CTAs take one span's heads); rows: keys a block; stages: ring depth;
    copies: TMA copies a block for K and for V (8 = 16-token pages); swizzle: the decode
    kernel's swizzled tiles in shared memory (else plain rows)."""

    tiles: int = 128
    rows: int = 128
    stages: int = 2
    copies: int = 1
    swizzle: bool = True

    @property
    def name(self) -> str:
        return (f"{self.tiles} CTAs, {self.rows}-key blocks x {self.stages} stages, "
                f"{self.copies} cop{'y' if self.copies == 1 else 'ies'} a block"
                + ("" if self.swizzle else ", no swizzle"))


def stream(k, v, config: StreamConfig, interpret=False):
    """Read every row of ``k`` and ``v`` (bf16 [T, Hkv, D]) once through TMA rings; returns an
    int32 [tiles] nobody writes (the call's output, so that XLA keeps it)."""
    t, h, d = k.shape
    span = t * h // config.tiles  # keys of one tile
    if span * config.tiles != t * h or span % config.rows or config.rows % config.copies:
        raise ValueError(f"{config} does not divide {t} keys x {h} heads")
    n_blocks, stages = span // config.rows, config.stages
    rpc = config.rows // config.copies
    transforms = ((plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
                  if config.swizzle else ())

    def body(k_ref, v_ref, out_ref, k_smem, v_smem, k_full, v_full, consumed):
        del out_ref
        c, wg = lax.axis_index("tile"), lax.axis_index("wg")
        head, first = lax.rem(c, h), (c // h) * span

        @pl.when(wg == 1)
        def _producer():
            @pl.loop(0, n_blocks)
            def _(j):
                slot = lax.rem(j, stages)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                for cp in range(config.copies):
                    src = pl.ds(first + j * config.rows + cp * rpc, rpc)
                    dst = pl.ds(cp * rpc, rpc)
                    plgpu.copy_gmem_to_smem(k_ref.at[src, head], k_smem.at[slot, dst],
                                            k_full.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[src, head], v_smem.at[slot, dst],
                                            v_full.at[slot])

            @pl.loop(max(0, n_blocks - stages), n_blocks)
            def _(j):  # observe every completion (interpret mode checks it)
                plgpu.barrier_wait(consumed.at[lax.rem(j, stages)])

        @pl.when(wg == 0)
        def _consumer():
            @pl.loop(0, n_blocks)
            def _(j):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])

    ring = plgpu.SMEM((stages, config.rows, d), k.dtype, transforms=transforms)
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((config.tiles,), jnp.int32),
        grid=(config.tiles,), grid_names=("tile",), num_threads=2, thread_name="wg",
        scratch_types=(ring, ring, plgpu.Barrier(num_arrivals=config.copies, num_barriers=stages),
                       plgpu.Barrier(num_arrivals=config.copies, num_barriers=stages),
                       plgpu.Barrier(num_barriers=stages)),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(k, v)


def forms() -> list[StreamConfig]:
    """The decode kernel's forms (128 tiles as at 8 x 32k and 1 x 128k; one copy a block over
    pages in order, eight over 16-token pages), then deeper rings, smaller blocks, and more
    CTAs than SMs, several a SM where their shared memory fits (as cuDNN's 128-thread CTAs
    run)."""
    return [StreamConfig(), StreamConfig(copies=8), StreamConfig(stages=3),
            StreamConfig(rows=64, stages=4), StreamConfig(rows=64, stages=2),
            StreamConfig(swizzle=False),
            StreamConfig(tiles=256, rows=64, stages=2), StreamConfig(tiles=512, rows=64, stages=2),
            StreamConfig(tiles=1024, rows=32, stages=2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=32 * 8192, help="keys per KV head (K and V)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    keys = jax.random.split(jax.random.key(0), 2)
    k = jax.random.normal(keys[0], (args.keys, HKV, D), jnp.bfloat16)
    v = jax.random.normal(keys[1], (args.keys, HKV, D), jnp.bfloat16)
    nbytes = 2 * k.nbytes
    fns = {c.name: jax.jit(lambda k, v, c=c: stream(k, v, c))
           for c in forms() if (args.keys * HKV) % (c.tiles * c.rows) == 0}
    xla = jax.jit(lambda k, v: jnp.sum(k, dtype=jnp.float32) + jnp.sum(v, dtype=jnp.float32))
    fns["XLA sum of K and V"] = xla
    times = gpu_rounds({name: (f, (k, v)) for name, f in fns.items()}, args.rounds)
    read = read_bandwidth(nbytes) / 1e12  # the decode benchmark's "read-only" ceiling
    rows = [{"form": n, "us": 1e3 * statistics.median(t), "rounds_us": [1e3 * x for x in t],
             "tb_s": nbytes / (statistics.median(t) * 1e-3) / 1e12} for n, t in times.items()]
    dev = jax.devices()[0].device_kind
    md = [f"# HBM read ceiling in the decode kernel's form, {dev}, {datetime.date.today()}", "",
          f"{nbytes / 1e9:.2f} GB (K and V of {args.keys} keys x {HKV} heads x {D}, bf16); GPU "
          f"time, median of {args.rounds} interleaved rounds; the decode benchmark's read-only "
          f"ceiling (XLA sum of 2 GiB, wall time) {read:.2f} TB/s in this run.", "",
          "| form | µs | TB/s | rounds, µs |", "|---|---|---|---|"]
    md += [f"| {r['form']} | {r['us']:.1f} | {r['tb_s']:.3f} | "
           + " / ".join(f"{x:.1f}" for x in r["rounds_us"]) + " |" for r in rows]
    print("\n".join(md), flush=True)
    stem = f"read-ceiling-{datetime.date.today()}{args.tag}"
    write_report(stem, {"device": dev, "bytes": nbytes, "read_only_tbps": read, "rows": rows},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
