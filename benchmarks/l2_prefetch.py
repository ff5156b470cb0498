"""L2 prefetch from the decode row kernels (``jaxattn.kernels.l2_prefetch``), one H200, FP8.

    python -m benchmarks.l2_prefetch [--mib 0,8,16,32] [--real-rows 1,8] [--rounds 5]

Scout's decode sites at full size, each a row kernel and the matmul after it, as a batch-1
or batch-8 decode step runs them (a 16-token bucket): the input norm and the q/k/v launch
("attention in"), the quantisation of the attention output and o_proj ("attention out"),
and the post-attention norm and the whole MoE block (the router, the routing kernel, the
gate/up launch with the shared expert, the SwiGLU, the down launch: "moe"). Each variant
warms this many MiB a call (0: off), all in one run, interleaved round by round; the weights
rotate over four copies (four routed experts for the MoE) so a call finds them in HBM, as a
model step does. Two times per call: the GPU kernels' sum (CUPTI), and the time per call in a
loop of calls under the serving step's XLA options (one CUDA graph: launch gaps as in the
step), meant to count a prefetch working in the gaps. On the H200 (session 36) that loop was
host-bound at these sizes (42 us a call against 14 us of kernels), so the kernels' sum is
the signal: a prefetch that paid would shorten the matmul by more than it lengthens the row
kernel.

JSON and a table to benchmarks/results/l2-prefetch-DATE{tag}.{json,md} (and $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

H, I, E, HQ, HKV = 5120, 8192, 16, 5120, 1024
ROWS = 16  # a decode step's bucket: the row kernels run its 16 rows
COPIES = 4  # weight sets in rotation: 4 x 37 MB (q/k/v) > the H200's 50 MB L2


def _fp8_weights(key, *shapes):
    """Random FP8 weights with their per-row scales, quantised on the device."""
    import jax
    import jax.numpy as jnp

    from jaxattn.kernels import fp8

    out = []
    for i, shape in enumerate(shapes):
        w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) / shape[-1] ** 0.5
        out.append(jax.jit(lambda w: fp8.quantize(w, -1))(w))
    return out


def sites(real_rows: int):
    """{site: (fn(config, *args) -> outputs, rotation: a list of argument tuples)}."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxattn.kernels import fp8_rows, grouped_matmul as gm, l2_prefetch as lp
    from jaxattn.models import llama4
    from jaxattn.models.llama4 import moe as moe_lib
    from jaxattn.models.llama4.quantization import Fp8Scheme

    key = jax.random.key(0)
    x = jax.random.normal(key, (ROWS, H), jnp.bfloat16)
    delta = jax.random.normal(jax.random.fold_in(key, 1), (ROWS, H), jnp.bfloat16)
    norm_w = jnp.ones((H,), jnp.bfloat16)
    warm = lambda c, *targets: None if c is None else lp.Warm(targets, c)

    def attention_in(c, x, delta, wq, wk, wv, sq, sk, sv):
        _, _, xq = fp8_rows.add_rms_norm_quantize(x, delta, norm_w, 1e-5,
                                                  prefetch=warm(c, lp.Target((wq, wk, wv))))
        return gm.dense_fp8(xq, (wq, wk, wv), (sq, sk, sv), joint=True)

    def attention_out(c, o, wo, so):
        oq = fp8_rows.quantize(o, prefetch=warm(c, lp.Target((wo,))))
        return gm.dense_fp8(oq, (wo,), (so,), defer=True)[0].values

    qkv = []
    for i in range(COPIES):
        (wq, sq), (wk, sk), (wv, sv) = _fp8_weights(jax.random.key(10 + i), (HQ, H), (HKV, H),
                                                    (HKV, H))
        qkv.append((x, delta, wq, wk, wv, sq, sk, sv))
    o = [(x, *(a for pair in _fp8_weights(jax.random.key(20 + i), (H, HQ)) for a in pair))
         for i in range(COPIES)]

    # The MoE block at Scout's shapes (random weights), its weights once: each prefetch config
    # is a graph of its own (the config is static) over the same state.
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=256, hidden_size=H, intermediate_size=I, intermediate_size_mlp=2 * I,
        num_hidden_layers=1, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_local_experts=E, num_experts_per_tok=1))
    make = lambda c: moe_lib.MoE(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                 fp8=Fp8Scheme(l2_prefetch=c))
    state = nnx.state(make(None))
    graphs = {}
    valid = jnp.arange(ROWS) < real_rows

    def moe_block(c, state, x, delta):
        if c not in graphs:
            graphs[c] = nnx.graphdef(nnx.eval_shape(lambda: make(c)))
        block = nnx.merge(graphs[c], state)
        shared = block.shared_expert
        _, h, hq = fp8_rows.add_rms_norm_quantize(
            x, delta, norm_w, 1e-5, prefetch=warm(c, lp.Target((shared.gate_proj.weight[...],
                                                                shared.up_proj.weight[...]))))
        return block(h, valid=valid, xq=hq, defer=True)[0].values

    # Other rows in each call of the rotation: the random router sends them to other experts.
    moe_rows = [(state, *jax.random.normal(jax.random.key(30 + i), (2, ROWS, H), jnp.bfloat16))
                for i in range(COPIES)]
    return {"attention in": (attention_in, qkv), "attention out": (attention_out, o),
            "moe": (moe_block, moe_rows)}


def run(args) -> dict:
    import jax

    from benchmarks.common import gpu_ms
    from jaxattn.kernels.l2_prefetch import L2Prefetch
    from jaxattn.serve.paged_step import step_compiler_options

    mibs = [float(m) for m in args.mib.split(",")]
    configs = {m: None if m == 0 else L2Prefetch(max_bytes=int(m * 2**20)) for m in mibs}
    options = step_compiler_options(traced_libraries=False)
    rows = []
    for real in [int(r) for r in args.real_rows.split(",")]:
        for site, (fn, rotation) in sites(real).items():
            calls = {m: jax.jit(lambda sets, c=c, fn=fn: [fn(c, *a) for a in sets],
                                compiler_options=options) for m, c in configs.items()}
            sets = (tuple(rotation),)
            kernel, device = {m: [] for m in mibs}, {m: [] for m in mibs}
            for f in calls.values():
                jax.block_until_ready(f(*sets))
            for _ in range(args.rounds):
                for m, f in calls.items():
                    kernel[m].append(gpu_ms(f, *sets, reps=args.reps) * 1e3 / len(rotation))
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        out = f(*sets)
                    jax.block_until_ready(out)
                    device[m].append((time.perf_counter() - t0) / args.reps / len(rotation) * 1e6)
            base = statistics.median(device[mibs[0]])
            for m in mibs:
                us = statistics.median(device[m])
                rows.append({"site": site, "real_rows": real, "mib": m, "device_us": us,
                             "kernel_us": statistics.median(kernel[m]), "vs_first": us / base})
                print(f"{site:14} rows={real} {m:5.1f} MiB: {us:7.2f} us a call "
                      f"({rows[-1]['kernel_us']:7.2f} us of kernels), {us / base:.3f}x",
                      flush=True)
    return {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "rounds": args.rounds, "reps": args.reps,
            "rotation": COPIES, "rows": rows}


def table(res: dict) -> str:
    lines = [f"# L2 prefetch at Scout's decode sites ({res['device']}, {res['date']})", "",
             f"Median of {res['rounds']} interleaved rounds; per call, rotating {res['rotation']}"
             " weight sets. Device us: a loop of calls under the serving step's XLA options "
             "(host-bound at these sizes on the H200); kernel us: the kernels' sum (CUPTI), "
             "the signal.", "",
             "| site | real rows | MiB | device us | kernel us | vs first |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['site']} | {r['real_rows']} | {r['mib']:g} | {r['device_us']:.2f} | "
                     f"{r['kernel_us']:.2f} | {r['vs_first']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.l2_prefetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", default="0,8,16,32", help="MiB warmed per call; 0: off (the base)")
    p.add_argument("--real-rows", default="1,8", help="tokens of the 16-row decode bucket")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    from benchmarks.common import write_report

    res = run(args)
    write_report(f"l2-prefetch-{res['date']}{args.tag}", res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
