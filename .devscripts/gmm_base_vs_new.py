"""Session 41 (for session 42's GPU): the FP8 decode launches as a batch-1 step makes them,
HEAD~ (scales loaded after the K loop) against the working tree (loaded before it),
interleaved, cold L2 (a rotation over 4 experts / weight copies), CUPTI kernel time.
Also the other decode kernels' base/new where they changed (decode, combine): see
decode_short2.py."""
import importlib.util, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jaxattn.kernels import fp8, grouped_matmul as new
from benchmarks.fp8_matmul import interleaved, HIT_EXPERTS

spec = importlib.util.spec_from_file_location("gmm_base", ".devscripts/base/grouped_matmul.py")
base = importlib.util.module_from_spec(spec); sys.modules["gmm_base"] = base; spec.loader.exec_module(base)
E, H, I = 16, 5120, 8192
res = []
DRY = bool(os.environ.get("DRY"))  # on a CPU: lower each function for CUDA, time nothing


def run(fns, first, rotation):
    if DRY:
        for f in fns.values():
            f.trace(*first).lower(lowering_platforms=("cuda",))
        return True, {k: 0.0 for k in fns}
    outs = [jax.block_until_ready(f(*first)) for f in fns.values()]
    same = all(bool(jnp.all(u == v)) for u, v in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
    return same, interleaved(fns, {t: rotation for t in fns}, 7, 20)


def q(shape, key):
    return jax.jit(lambda w: fp8.quantize(w, -1))(
        jax.random.normal(jax.random.key(key), shape, jnp.bfloat16) / float(np.sqrt(shape[-1])))


for name, (k, ns) in {"gate/up+shared": (H, (I, I)), "down+shared": (I, (H,))}.items():
    routed = [q((E, n, k), i) for i, n in enumerate(ns)]  # (values [E, N, K], scales [E, N])
    shared = [q((n, k), 10 + i) for i, n in enumerate(ns)]
    for real in (1, 8):
        x = fp8.Quantized(*fp8.quantize(jax.random.normal(jax.random.key(3), (16, k),
                                                          jnp.bfloat16), -1), jnp.bfloat16)
        x = fp8.Quantized(x.values, jnp.concatenate([x.scale, x.scale]), jnp.bfloat16)
        rot = []
        for e in HIT_EXPERTS:
            groups = np.full(16, E, np.int32); groups[:real] = (e + 2 * np.arange(real)) % E
            # The weights as arguments: closed over they are GBs of HLO constants (no compile).
            rot.append((x, jnp.asarray(groups), tuple(w for w, _ in routed),
                        tuple(s for _, s in routed), tuple(w for w, _ in shared),
                        tuple(s for _, s in shared)))
        fns = {tag: jax.jit(lambda x, g, rw, rs, sw, ss, mod=mod: mod.grouped_matmul_fp8_by_row(
            x, rw, rs, g, impl="mosaic", shared=(sw, ss), defer=True).values)
            for tag, mod in (("base", base), ("new", new))}
        same, t = run(fns, rot[0], rot)
        res.append({"matmul": name, "real_rows": real, "same": same,
                    **{f"{k}_us": v * 1e6 for k, v in t.items()}})
        print(res[-1], flush=True)
for name, (k, ns) in {"q/k/v": (H, (5120, 1024, 1024)), "o": (5120, (H,))}.items():
    copies = [tuple(zip(*(q((n, k), 20 + 5 * c + i) for i, n in enumerate(ns)))) for c in range(4)]
    x = fp8.Quantized.of(jax.random.normal(jax.random.key(9), (16, k), jnp.bfloat16))
    fns = {tag: jax.jit(lambda x, ws, ss, mod=mod: mod.dense_fp8(x, ws, ss, impl="mosaic"))
           for tag, mod in (("base", base), ("new", new))}
    same, t = run(fns, (x, *copies[0]), [(x, *c) for c in copies])
    res.append({"matmul": name, "rows": 16, "same": same, **{f"{k}_us": v * 1e6 for k, v in t.items()}})
    print(res[-1], flush=True)
os.makedirs(os.environ.get("OUT", "/tmp") + "/results", exist_ok=True)
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/results/gmm-scale-loads-2026-12-05-s41.json", "w"), indent=1)

# Part 2: tile sweep of the by-row launches with the shared expert at batch 1 (the working
# tree's kernel). gate/up + shared is 256 items of 128 weight rows on 132 SMs (two waves);
# 256-row tiles make it one wave of 128. down + shared is 80 items (52 SMs idle); 64-row
# tiles make 160.
import dataclasses
CONFIGS = {"gate/up+shared": {"n256_k256_s3": (256, 256, 3), "n256_k128_s6": (256, 128, 6)},
           "down+shared": {"n64_k256_s8": (64, 256, 8), "n64_k512_s4": (64, 512, 4)}}
for name, (k, ns) in {"gate/up+shared": (H, (I, I)), "down+shared": (I, (H,))}.items():
    routed = [q((E, n, k), i) for i, n in enumerate(ns)]
    shared = [q((n, k), 10 + i) for i, n in enumerate(ns)]
    parts = tuple(w for w, _ in routed) + tuple(w[None] for w, _ in shared)
    scales = tuple(s for _, s in routed) + tuple(s[None] for _, s in shared)
    x = fp8.quantize(jax.random.normal(jax.random.key(3), (16, k), jnp.bfloat16), -1)[0]
    pick = dataclasses.replace(new.pick_config(16, k, sum(ns), fp8=True), block_m=16)
    cfgs = {"pick": pick} | {c: new.GroupedMatmulConfig(block_m=16, block_n=bn, block_k=bk,
                                                        max_concurrent_steps=st, swap_ab=True)
                             for c, (bn, bk, st) in CONFIGS[name].items()}
    for real in (1, 8):
        rot = []
        for e in HIT_EXPERTS:
            groups = np.full(16, E, np.int32); groups[:real] = (e + 2 * np.arange(real)) % E
            rot.append((jnp.asarray(groups), parts, scales))
        fns = {c: jax.jit(lambda g, parts, scales, cfg=cfg: new._mosaic_grouped_matmul(
            x, parts, g, scales, config=cfg, by_row=True, shared_blocks=(0, 0),
            out_dtype=jnp.bfloat16)) for c, cfg in cfgs.items()}
        try:
            if DRY:
                for f in fns.values():
                    f.trace(*rot[0]).lower(lowering_platforms=("cuda",))
                t = {c: 0.0 for c in fns}
            else:
                outs = {c: np.asarray(jax.block_until_ready(f(*rot[0])), np.float32)
                        for c, f in fns.items()}
                rows = list(range(real)) + list(range(16, 32))  # routed rows held, all shared
                err = {c: float(np.abs(o[rows] - outs["pick"][rows]).max()) for c, o in outs.items()}
                t = interleaved(fns, {c: rot for c in fns}, 7, 20)
            res.append({"sweep": name, "real_rows": real, **{f"{c}_us": v * 1e6 for c, v in t.items()},
                        **({} if DRY else {"max_abs_diff_vs_pick": err})})
            print(res[-1], flush=True)
        except Exception as ex:
            print(name, real, "FAILED", type(ex).__name__, str(ex)[:300], flush=True)
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/results/gmm-scale-loads-2026-12-05-s41.json", "w"), indent=1)
