"""Multi-GPU run (issue 9): the full-size Scout architecture, tensor parallel over all GPUs,
prompts past 10,000 tokens, through the serving engine.

    python -m benchmarks.multigpu                 # a multi-GPU machine: TP over every GPU
    python -m benchmarks.multigpu -tp 4 -ep 2     # another split of 8 GPUs
    python -m benchmarks.multigpu --dry-run       # CPU: 8 simulated devices, a tiny config
    python -m benchmarks.multigpu -tp 1 --quantization fp8 --max-num-seqs 8   # one H200
    python -m benchmarks.multigpu --kv-cache-dtype fp8 --lengths 1048576 --skip-alone \
        --max-num-seqs 4 --decode-batches ''            # 2xH200: the 1M-token prompt

1. Scout's architecture (``models/llama4/configs/scout.json``: 48 layers, 16 experts, real
   widths) with random bf16 weights drawn on the devices, each device only its shards
   (``sharding.init_random``): no checkpoint, nothing on the host. ``--quantization fp8``:
   the routed experts, shared expert and MLPs drawn one parameter at a time and quantised
   on the device (FP8, ~105 GiB: all of Scout on one H200).
2. The engine of ``python -m jaxattn.serve`` (``LLMEngine`` over ``Llama4Runner``: chunked
   prefill, paged KV cache split by KV head, continuous batching), warmed up over its
   token buckets; compiles are counted from then on and must stay at zero.
3. Prompts of 8192, 9999, 10000, 10001, 16384, 32768, 65536 and 131072 tokens, each alone,
   then all at once as one mixed concurrent batch, each decoding ``--decode-tokens``
   greedy tokens (EOS ignored). Every request must complete.
4. Per request: time to first token (TTFT), prefill tokens/s (prompt / TTFT) and MFU (useful
   FLOPs against the bf16 peak, per GPU), decode tokens/s and ms per step next to its
   roofline (the bytes each device must read per step / the same-run read bandwidth,
   ``benchmarks/roofline.py``); per device: memory in use and peak; the compile count after
   warm-up; the memory plan. JSON to ``benchmarks/results/`` (and ``$OUT`` when set); a
   table on stdout.
5. Mixed vs alone: the chosen token's logprob at the first decode steps, while both runs
   chose the same tokens, and the first step where they did not (a flip), judged with the
   bf16 tolerances measured for the single-device path.
6. Batch decode throughput at ``--decode-context`` (8192) for ``--decode-batches`` (1, 8,
   32, 64): ms per step, output tokens/s and the ratio to the roofline; batches the
   sequence limit or KV cache cannot hold are recorded as skipped.
7. ``--profile-steps``: a JAX profiler trace of batch-1 decode steps and of one prefill
   step (GPU kernels by time, the Mosaic launches counted apart, host events; the
   once-a-layer kernels' times per call and by attention kind), and the KV pages still in
   use after the run (0: nothing leaked). With ``--dump-hlo DIR`` each XLA kernel of the
   profile also gets the ops and source lines it was fused from (a step's kernels run in
   CUDA graphs, where the profiler names no HLO op).

``--dry-run`` runs the same script on the CPU with 8 simulated devices, a 4-layer toy
model with chunk 64 and lengths scaled to it (64, 78, 79, 80, 128, 256, 512, 1024: the
chunk boundary, just past it, 2-16 chunks), so it checks everything but the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LENGTHS = (8192, 9999, 10000, 10001, 16384, 32768, 65536, 131072)
DRY_LENGTHS = (64, 78, 79, 80, 128, 256, 512, 1024)
DRY_DEVICES = 8
TOP_LOGPROBS = 5  # recorded per decode step (the chosen token's logprob is compared)
COMPARE_STEPS = 4  # the first decode steps whose logprobs are compared
# A prompt's last chunk (e.g. 1809 tokens of 10001) in a 2048-token step instead of a whole
# T-token one: the engine's default ladder has every power of two; the benchmark compiles
# three sizes to keep its warm-up short (~95 s per size at 48 layers).
TAIL_BUCKET = 2048
STEP_MODULE = "jit_jitted"  # the engine step's jitted function, as XLA names its module
PROFILE_TAIL = 32  # tokens the profiled request may decode (--profile-steps stays below)


@dataclasses.dataclass(frozen=True)
class Switch:
    """A module-level switch of the serving step's kernels, a --flag / --no-flag here."""

    flag: str
    default: bool
    module: str
    name: str
    help: str


SWITCHES = (
    Switch("route_in_norm", True, "jaxattn.models.llama4.model", "ROUTE_IN_NORM",
           "FP8 MoE decode steps route their rows in the post-attention norm's kernel (two "
           "launches a layer fewer)"),
    Switch("static_o_scale", True, "jaxattn.models.llama4.model", "STATIC_O_SCALE",
           "FP8 attention projections take the attention output under its layer's V scale, "
           "written as FP8 by the decode kernels (one launch a layer fewer)"),
    Switch("swiglu_in_gate_up", True, "jaxattn.models.llama4.moe", "SWIGLU_IN_GATE_UP",
           "FP8 MoE decode steps form the SwiGLU in the gate/up launch and run the down "
           "projection on its f16 rows (one launch a layer fewer)"),
    Switch("router_in_smem", True, "jaxattn.kernels.fp8_rows", "ROUTER_IN_SMEM",
           "the routing norm copies the router into shared memory before it waits for the "
           "kernel before it"),
    Switch("joint_router_sums", True, "jaxattn.kernels.fp8_rows", "JOINT_ROUTER_SUMS",
           "the routing norm sums its experts' dot products across the warpgroup in one "
           "crossing (one barrier, not two per expert)"),
    Switch("merge_pages", True, "jaxattn.kernels.decode", "MERGE_PAGES",
           "the decode kernels over a bf16 cache (or an FP8 one with one K and one V scale) "
           "copy a block whose pages lie in order in the pool in one TMA copy for K and one "
           "for V (DecodeConfig.merge_pages)"),
    Switch("fold_combine", False, "jaxattn.kernels.decode", "FOLD_COMBINE",
           "the decode kernel merges split parents itself (the CTA finishing a parent's last "
           "piece; DecodeConfig.fold_combine) instead of a combine kernel after it"),
    # Its default read without importing jax (--dry-run sets the simulated devices before
    # jax starts).
    Switch("dependent_launch", os.environ.get("JAXATTN_DEPENDENT_LAUNCH", "1") == "1",
           "jaxattn.kernels.common", "DEPENDENT_LAUNCH",
           "every Mosaic kernel waits for the one before it on the GPU and lets the next "
           "launch early (programmatic dependent launch; default: on, unless "
           "JAXATTN_DEPENDENT_LAUNCH=0)"),
)
# Scout's structure at toy size for --dry-run (heads, experts and vocabulary divide 8 devices).
DRY_CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
    attention_chunk_size=64, floor_scale=64, max_position_embeddings=1 << 20,
    bos_token_id=0, eos_token_id=[1], pad_token_id=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multigpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help=f"CPU, {DRY_DEVICES} simulated devices, a tiny config and scaled lengths")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="default: every device (divided by the expert parallel size)")
    p.add_argument("--expert-parallel-size", "-ep", type=int, default=1)
    p.add_argument("--layers", type=int, default=None,
                   help="override num_hidden_layers (a slice of Scout; default: all 48)")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the batch decode's sampling (default greedy; Scout's generation_config "
                        "says 0.6 with --top-p 0.9, what a request without them gets); seeded, "
                        "so runs compare token for token")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default 8192; --dry-run 64)")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="batch decode rows above it are skipped; each admitted sequence keeps "
                   "a live chunk of pages, so more shrinks the KV capacity (2xH200 bf16: 16 "
                   "-> 470,912 tokens, 64 -> 227,088). Batch 32 at 8k needs the FP8 cache and 32")
    p.add_argument("--buckets", default=None,
                   help="step sizes to compile (default 16,2048,T: decode steps, prompt tails "
                   "and whole prefill chunks; each bucket is one compile of every layer)")
    p.add_argument("--page-size", type=int, default=None,
                   help="default: the engine's (16; 32 with --kv-cache-dtype fp8)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV budget per device (default: the engine's rule)")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "mosaic"])
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="FP8 expert/MLP weights (one H200 holds all of Scout)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="with --quantization fp8: the q/k/v/o projections FP8 too "
                        "(Fp8Scheme(attention=True); 29%% of a batch-1 step's bytes in bf16)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["bf16", "fp8"],
                   help="fp8: the FP8 KV cache (about twice the tokens; issue 21's 1M-token run)")
    for switch in SWITCHES:
        p.add_argument("--" + switch.flag.replace("_", "-"), default=switch.default,
                       action=argparse.BooleanOptionalAction,
                       help=f"{switch.help} ({switch.module}.{switch.name})")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps per device call for small decode batches (the engine's "
                        "--num-scheduler-steps: the host's per-call work paid once a burst)")
    p.add_argument("--async-scheduling", default=True, action=argparse.BooleanOptionalAction,
                   help="the engine's async scheduling (off: each step waits for the last)")
    p.add_argument("--skip-alone", action="store_true", help="only the mixed batch")
    p.add_argument("--alone-rounds", type=int, default=1,
                   help="serve each prompt alone this many times, one after another (its "
                   "TTFT of every round is recorded; the table shows the median round)")
    p.add_argument("--compile-cache", default=None,
                   help="directory for JAX's persistent compilation cache (reused across runs)")
    p.add_argument("--out", default=RESULTS, help="directory for the JSON result")
    p.add_argument("--decode-batches", default=None,
                   help="batch decode throughput at --decode-context: comma-separated batch "
                        "sizes (default 1,8,32,64; dry run 1,4; '' to skip)")
    p.add_argument("--decode-context", type=int, default=None,
                   help="context of each sequence of the batch decode rows (default 8192)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="at least this max_model_len (default: what the prompts, the decode "
                   "context and the profiled prefill need), to time a step's cost against it")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="trace this many batch-1 decode steps at --decode-context, and one "
                   "prefill step (JAX profiler): GPU kernels and host events per step "
                   "(default 6; 0 to skip both)")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="with the profile: dump the step's optimised HLO into DIR and give "
                        "each XLA kernel of the profile the source lines it was fused from "
                        "(benchmarks.hlo_dump)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    return p


def _setup_environment(dry_run: bool, dump_hlo: str | None = None) -> None:
    """Before JAX starts: simulated devices for the dry run; on GPUs let XLA use 90% of memory
    (JAX preallocates 75% by default; the weights take most of it). ``dump_hlo``: XLA dumps
    the engine step's modules there."""
    if dump_hlo:
        from benchmarks.hlo_dump import dump_flags

        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"{dump_flags(dump_hlo, STEP_MODULE)}").strip()
    if dry_run:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = \
                f"{flags} --xla_force_host_platform_device_count={DRY_DEVICES}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # the allocator stays XLA's default, as in the serving engine (serve/allocator.py)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")


def _config(args):
    from jaxattn.models import llama4
    from jaxattn.serve import memory_plan as memory

    if args.dry_run:
        d = dict(DRY_CONFIG)
    else:
        with open(os.path.join(memory.CONFIGS, "scout.json")) as f:
            d = dict(json.load(f)["text_config"])
    if args.layers:
        d["num_hidden_layers"] = args.layers
        d.pop("no_rope_layers", None)  # recomputed for the new depth (every 4th NoPE)
    return llama4.Llama4Config.from_hf_dict(d)


def device_memory() -> list[dict]:
    import jax

    from jaxattn.serve import allocator

    out = []
    for d in jax.local_devices():
        # (free, limit) from the allocator's statistics, or (VMM keeps none) the driver's view.
        memory = allocator.device_memory(d)
        stats = (d.memory_stats() if hasattr(d, "memory_stats") else None) or {}
        out.append({"device": str(d),
                    "bytes_in_use": None if memory is None else memory[1] - memory[0],
                    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                    "bytes_limit": None if memory is None else memory[1]})
    return out


def drive(engine, prompts: list[list[int]], decode_tokens: int,
          waits: list | None = None, temperature: float = 0.0, top_p: float = 1.0) -> list[dict]:
    """Submit every prompt at once and step the engine until all finish; per-request timings.
    ``waits``: gets (seconds since the start, the engine's device_wait_s) after each step."""
    from jaxattn.serve.sampling_params import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0,
                            max_tokens=decode_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS)
    t0 = time.perf_counter()
    recs = {}
    for i, p in enumerate(prompts):
        rid = f"r{i}-{len(p)}"
        engine.add_request(rid, p, params, arrival_time=time.monotonic())
        recs[rid] = {"prompt_tokens": len(p), "times": [], "tokens": [], "finish": None,
                     "error": None, "top": [], "chosen": []}
    while engine.has_unfinished():
        deltas = engine.step()
        now = time.perf_counter()
        if waits is not None:
            waits.append((now - t0, engine.stats().device_wait_s))
        for d in deltas:
            r = recs[d.request_id]
            if d.token_ids:
                r["times"].append(now)
                r["tokens"].extend(d.token_ids)
                if len(r["top"]) < COMPARE_STEPS:
                    r["top"].extend([[list(x) for x in lp.top] for lp in d.logprobs or ()])
                    r["chosen"].extend(lp.logprob for lp in d.logprobs or ())
            if d.finish_reason is not None:
                r["finish"], r["error"] = d.finish_reason, d.error
    out = []
    for rid, r in recs.items():
        times = r["times"]
        ttft = times[0] - t0 if times else None
        dec = len(times) - 1
        out.append({
            "prompt_tokens": r["prompt_tokens"], "output_tokens": len(r["tokens"]),
            "finish_reason": r["finish"], "error": r["error"], "ttft_s": ttft,
            "prefill_tok_s": r["prompt_tokens"] / ttft if ttft else None,
            "decode_tok_s": dec / (times[-1] - times[0]) if dec > 0 and times[-1] > times[0]
            else None,
            "decode_ms_per_step": 1e3 * (times[-1] - times[0]) / dec if dec > 0 else None,
            "e2e_s": times[-1] - t0 if times else None, "token_ids": r["tokens"],
            "top_logprobs": r["top"][:COMPARE_STEPS],
            "chosen_logprobs": r["chosen"][:COMPARE_STEPS]})
    return out


def compare_logprobs(mixed: dict, alone: dict) -> dict:
    """Mixed vs alone at the first decode steps: the largest change of the chosen token's
    logprob while both runs chose the same tokens, and the step where they first chose
    different ones (``flipped_at``; after it the contexts differ). The chosen token's
    logprob is always defined, where top-5 sets of near-flat random-weight logits may not
    even overlap."""
    diff, steps = 0.0, 0
    for step, (a, b) in enumerate(zip(mixed["chosen_logprobs"], alone["chosen_logprobs"])):
        if mixed["token_ids"][step] != alone["token_ids"][step]:
            return {"max_abs_diff": diff, "steps": steps, "flipped_at": step}
        diff, steps = max(diff, abs(a - b)), step + 1
    return {"max_abs_diff": diff, "steps": steps, "flipped_at": None}


def judge_logprobs(cmp: dict) -> bool:
    """With the bf16 tolerances measured for the single-device path
    (benchmarks/length_sweep.py GPU_SPEC): every change within flip_atol, and at most
    flip_frac of the requests beyond lp_atol or flipped (routing near-ties); a batching bug
    moves logprobs by whole units, or flips most requests."""
    from benchmarks.length_sweep import GPU_SPEC

    if not cmp:
        return False
    diffs = [c["max_abs_diff"] for c in cmp.values()]
    odd = sum(c["max_abs_diff"] > GPU_SPEC.lp_atol or c["flipped_at"] is not None
              for c in cmp.values())
    return max(diffs) <= GPU_SPEC.flip_atol and odd <= GPU_SPEC.flip_frac * len(cmp) + 1e-9


def apply_switches(args) -> None:
    """Set each of :data:`SWITCHES` as ``args`` has it (each is read when a step is traced
    or built, so before the engine is made)."""
    for switch in SWITCHES:
        setattr(importlib.import_module(switch.module), switch.name, getattr(args, switch.flag))


def roofline_ms(config, res: dict, batch: int, kv_len: int) -> float:
    """Bytes each device must read for one decode step / the same-run read bandwidth."""
    from benchmarks.roofline import decode_bytes

    b = decode_bytes(config, batch, kv_len, fp8=res.get("quantization") == "fp8",
                     fp8_attention=res.get("fp8_attention", False))
    return (b["weight_bytes"] + b["kv_bytes"]) / res["num_devices"] / res["read_bytes_s"] * 1e3


def mfu(config, res: dict, prompt: int, ttft_s: float) -> float:
    """Model FLOPs utilisation of one prompt's prefill, per GPU, against the bf16 peak."""
    from benchmarks.roofline import BF16_PEAK_TFLOPS, prefill_flops

    return prefill_flops(config, prompt) / ttft_s / res["num_devices"] / (BF16_PEAK_TFLOPS * 1e12)


def decode_context(args) -> int:
    """Tokens of context of the batch decode rows and the profiled decode step."""
    return args.decode_context or (100 if args.dry_run else 8192)


def decode_batches(args) -> list[int]:
    spec = args.decode_batches
    return ([int(x) for x in spec.split(",") if x] if spec is not None else
            [1, 4] if args.dry_run else [1, 8, 32, 64])


def batch_decode(engine, config, res: dict, args, rng) -> list[dict]:
    """Output tokens/s of B sequences decoding together at ``context`` tokens each (prompts
    prefilled first, then timed from the step all have their first token)."""
    ctx = decode_context(args)
    rows = []
    for b in decode_batches(args):
        need = b * (ctx + args.decode_tokens)
        if b > args.max_num_seqs or need > res["kv_tokens"]:
            rows.append({"batch": b, "context": ctx, "skipped":
                         f"needs max_num_seqs >= {b} and {need:,} KV tokens "
                         f"(have {args.max_num_seqs}, {res['kv_tokens']:,})"})
            continue
        prompts = [rng.integers(3, config.vocab_size, ctx).tolist() for _ in range(b)]
        waits = []
        recs = drive(engine, prompts, args.decode_tokens, waits, args.temperature, args.top_p)
        start = max(r["ttft_s"] for r in recs)  # every sequence has its first token
        end = max(r["e2e_s"] for r in recs)
        steps = args.decode_tokens - 1
        ms = 1e3 * (end - start) / steps if end > start else None
        # the part of a step the host spent waiting for the device (~0: host-bound)
        timed = [w for t, w in waits if start <= t <= end]
        wait_ms = 1e3 * (timed[-1] - timed[0]) / steps if len(timed) > 1 else None
        roof = roofline_ms(config, res, b, ctx + args.decode_tokens // 2)
        rows.append({"batch": b, "context": ctx, "ms_per_step": ms,
                     "output_tok_s": b * 1e3 / ms if ms else None, "roofline_ms": roof,
                     "ratio_to_roofline": ms / roof if ms else None,
                     "device_wait_ms_per_step": wait_ms,
                     "all_completed": all(r["finish_reason"] == "length" for r in recs),
                     # seeded prompts, weights and draws: runs that change only how the
                     # kernels are launched must give these bit for bit
                     "token_ids": [r["token_ids"] for r in recs],
                     "chosen_logprobs": [r["chosen_logprobs"] for r in recs]})
        print(f"batch decode {b:>3} x {ctx}: {ms or 0:.2f} ms/step "
              f"({rows[-1]['output_tok_s'] or 0:,.0f} tok/s), roofline {roof:.2f} ms, host "
              f"waited {wait_ms or 0:.2f} ms/step for the device", flush=True)
    return rows


def profile_step(engine, config, args, rng, *, prompt_len: int, reps: int,
                 decode: bool) -> dict:
    """Where an engine step's time goes, host and GPU (benchmarks.common.trace_summary over
    ``reps`` steps of one request of ``prompt_len`` tokens): its decode steps (``decode``:
    once it has its first token) or a prefill step (a chunk in the middle of the prompt)."""
    from benchmarks.common import kernel_kind, trace_summary
    from jaxattn.serve.sampling_params import SamplingParams

    engine.add_request("profile", rng.integers(3, config.vocab_size, prompt_len).tolist(),
                       SamplingParams(temperature=0, max_tokens=PROFILE_TAIL, ignore_eos=True))
    while decode and not any(d.token_ids for d in engine.step()):
        pass  # prefill until the first token
    t0 = time.perf_counter()
    out = trace_summary(engine.step, reps=reps, top=120)  # one untraced step, then reps
    out.update(steps=reps, prompt_tokens=prompt_len,
               wall_ms_per_step=1e3 * (time.perf_counter() - t0) / (reps + 1),
               by_layer_kind=by_layer_kind(out["kernels"], config))
    engine.abort("profile")
    while engine.has_unfinished():
        engine.step()
    what = f"batch-1 decode at {prompt_len}" if decode else f"prefill chunk of {prompt_len}"
    print(f"profile, {what}: {out['kernel_calls']} kernels ({out['mosaic_calls']} Mosaic), "
          f"{out['kernel_ms']:.2f} ms of GPU "
          f"kernels per step (busy {out['timeline']['busy_ms']:.2f} ms, idle between them "
          f"{out['timeline']['idle_ms']:.2f} ms); by kind: "
          + ", ".join(f"{r['name']} {r['ms']:.2f} ms ({r['calls']})" for r in out["kinds"])
          + "; top kernels: "
          + ", ".join(f"{r['name'][:40]} {r['ms']:.2f} ms" for r in out["kernels"][:4])
          # The host's share: PJRT's execute calls, and XLA's thunks (kernels, graphs) within
          # them: their prepare and initialize stages, and the graph's launch.
          + "; host per step: " + ", ".join(
              f"{r['name']} {r['ms']:.2f} ms" for r in out["host"]
              if r["name"].endswith(("LoadedExecutable::Execute", "ExecuteThunks",
                                     "Thunks::Prepare", "Thunks::Initialize"))
              or r["name"].startswith("cuGraphLaunch")),
          flush=True)
    print("  idle after: " + ", ".join(f"{g['after']} {g['us']} µs ({g['count']})"
                                       for g in out["timeline"]["gaps"][:8]), flush=True)
    attention = {k: v for k, v in out["by_layer_kind"].items() if kernel_kind(k) == "attention"}
    if attention:
        print("  attention by layer kind, µs a call: " + "; ".join(
            f"{k.split('_mosaic')[0]}: " + ", ".join(f"{kind} {us}" for kind, us in v.items())
            for k, v in attention.items()), flush=True)
    return out


def by_layer_kind(kernels: list[dict], config) -> dict:
    """{kernel: {"global": µs, "chunked": µs}}: the mean time a call of each kernel that runs
    once per layer (``per_call_us`` of ``num_hidden_layers`` calls, in layer order), over the
    layers of each attention kind. Past a chunk's length the chunked-local layers read only
    the live chunk's keys, so one kernel's calls differ by kind."""
    n = config.num_hidden_layers
    kinds = ["chunked" if config.is_chunked(i) else "global" for i in range(n)]
    if len(set(kinds)) < 2:
        return {}
    out = {}
    for row in kernels:
        times = row.get("per_call_us")
        if times and len(times) == n:
            out[row["name"]] = {kind: round(sum(t for t, k in zip(times, kinds) if k == kind)
                                            / kinds.count(kind), 2)
                                for kind in ("global", "chunked")}
    return out


def add_sources(profile: dict, dump_dir: str, show: int = 12) -> None:
    """Each XLA kernel row of ``profile`` (neither a Mosaic kernel nor a library's) gets
    ``sources``: the ops and source lines its fusion holds (benchmarks.hlo_dump); the
    ``show`` slowest are printed."""
    from benchmarks.common import kernel_kind
    from benchmarks.hlo_dump import fusion_sources

    rows = [r for r in profile["kernels"] if "mosaic" not in r["name"]
            and kernel_kind(r["name"]) != "dense matmul"]
    found = fusion_sources(dump_dir, [r["name"] for r in rows], module=STEP_MODULE)
    for r in rows:
        if r["name"] in found:
            r["sources"] = found[r["name"]]["ops"]
    for r in sorted((r for r in rows if "sources" in r), key=lambda r: -r["ms"])[:show]:
        where = sorted({frames[0] for _, frames in r["sources"] if frames})
        print(f"  {r['name']} ({r['calls']} calls, {r['ms']:.3f} ms): "
              f"{', '.join(op.split('/')[-1] for op, _ in r['sources'])[:120]} <- "
              f"{'; '.join(where)[:240]}", flush=True)


def run(args) -> dict:
    import jax
    import numpy as np

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from jaxattn import parallel
    from jaxattn.models.llama4 import sharding
    from jaxattn.serve import memory_plan as memory
    from jaxattn.serve.config import DEFAULT_PAGE_SIZE, EngineConfig
    from jaxattn.serve.engine import LLMEngine
    from jaxattn.serve.model_runner import Llama4Runner

    apply_switches(args)
    config = _config(args)
    lengths = (tuple(int(x) for x in args.lengths.split(",")) if args.lengths else
               DRY_LENGTHS if args.dry_run else LENGTHS)
    t = args.max_num_batched_tokens or (64 if args.dry_run else 8192)
    buckets = (tuple(int(b) for b in args.buckets.split(",")) if args.buckets else
               tuple(sorted({16, min(TAIL_BUCKET, t), t})))
    ep = args.expert_parallel_size
    tp = args.tensor_parallel_size or jax.device_count() // ep
    pc = parallel.ParallelConfig(tensor=tp, expert=ep)
    mesh = parallel.replica_meshes(parallel.make_mesh(pc))[0]
    dtype = "bfloat16"
    ctx = decode_context(args)
    longest = max(max(lengths) + args.decode_tokens, ctx + max(args.decode_tokens, PROFILE_TAIL),
                  0 if args.profile_steps == 0 else 3 * t + PROFILE_TAIL,  # profiled prefill
                  args.max_model_len or 0)
    page = args.page_size or DEFAULT_PAGE_SIZE[args.kv_cache_dtype == "fp8"]
    max_len = -(-longest // page) * page
    engine_config = EngineConfig(
        max_model_len=max_len, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=t,
        page_size=page, kv_cache_memory=args.kv_cache_memory, buckets=buckets,
        kv_cache_dtype=args.kv_cache_dtype, async_scheduling=args.async_scheduling,
        num_scheduler_steps=args.num_scheduler_steps, dtype=dtype, enable_prefix_caching=False,
        attention_impl=args.impl,
        tensor_parallel_size=tp, expert_parallel_size=ep, quantization=args.quantization)
    res = {"date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
           "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
           "platform": jax.devices()[0].platform, "jax": jax.__version__,
           "mesh": pc.describe(), "layers": config.num_hidden_layers,
           "experts": config.num_local_experts, "hidden": config.hidden_size,
           "dtype": dtype, "quantization": args.quantization, "impl": args.impl,
           "fp8_attention": bool(args.quantization and args.fp8_attention),
           "kv_cache_dtype": args.kv_cache_dtype or dtype,
           "async_scheduling": args.async_scheduling,
           "num_scheduler_steps": args.num_scheduler_steps,
           **{switch.flag: getattr(args, switch.flag) for switch in SWITCHES},
           "command_buffer": os.environ.get("JAXATTN_COMMAND_BUFFER"),
           "xla_flags": os.environ.get("XLA_FLAGS"),
           "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR"),
           "max_model_len": max_len,
           "max_num_batched_tokens": t, "buckets": list(buckets), "page_size": page,
           "decode_tokens": args.decode_tokens, "lengths": list(lengths),
           "batch_decode_sampling": {"temperature": args.temperature, "top_p": args.top_p,
                                     "top_logprobs": TOP_LOGPROBS}}
    plan = memory.for_engine(config, engine_config, dtype=dtype, devices=mesh.devices.flat)
    if plan is not None:
        print(memory.describe(plan), flush=True)
        res["memory_plan"] = {"usable": plan.usable, "weights": plan.weights,
                              "activations": plan.activations, "kv_budget": plan.kv_budget,
                              "kv_tokens": plan.kv_tokens, "fits": plan.fits,
                              "reason": plan.reason}
        if not plan.fits:
            raise SystemExit(f"error: {plan.reason}")

    t0 = time.perf_counter()
    from jaxattn.models.llama4.quantization import scheme

    fp8 = scheme(args.quantization)
    if fp8 is not None and args.fp8_attention:
        fp8 = dataclasses.replace(fp8, attention=True)
    model = sharding.init_random(config, mesh, seed=0, dtype=dtype, fp8=fp8)
    jax.block_until_ready(jax.tree.leaves(model))
    res["init_s"] = time.perf_counter() - t0
    res["memory_after_weights"] = device_memory()
    print(f"weights drawn on {mesh.size} devices in {res['init_s']:.1f} s", flush=True)
    runner = Llama4Runner(model, engine_config)
    engine = LLMEngine(runner, None)
    res["kv_pages"], res["kv_tokens"] = runner.num_pages, runner.num_pages * page
    res["kv_chunked_pages"] = runner.num_chunked_pages  # the chunked-local layers' live chunks
    t0 = time.perf_counter()
    engine.warmup()
    res["warmup_s"] = time.perf_counter() - t0
    res["compiles_warmup"] = warm = engine.compile_count
    print(f"warm-up: {len(buckets)} buckets {buckets}, {warm} compiles, {res['warmup_s']:.1f} s; "
          f"KV cache {res['kv_tokens']:,} tokens per replica", flush=True)

    from benchmarks.roofline import read_bandwidth

    res["read_bytes_s"] = read_bandwidth()
    print(f"read bandwidth {res['read_bytes_s'] / 1e12:.2f} TB/s", flush=True)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(3, config.vocab_size, n).tolist() for n in lengths}
    res["alone"] = {}
    if not args.skip_alone:
        for n in lengths:
            rounds = [drive(engine, [prompts[n]], args.decode_tokens)[0]
                      for _ in range(args.alone_rounds)]
            r = sorted(rounds, key=lambda x: x["ttft_s"] or 0)[len(rounds) // 2]
            r["ttft_rounds_s"] = [x["ttft_s"] for x in rounds]
            r["roofline_ms"] = roofline_ms(config, res, 1, n + args.decode_tokens // 2)
            r["mfu"] = mfu(config, res, n, r["ttft_s"]) if r["ttft_s"] else None
            res["alone"][str(n)] = r
            print(f"alone {n:>7}: TTFT {r['ttft_s']:.2f} s, prefill {r['prefill_tok_s']:,.0f} "
                  f"tok/s, decode {r['decode_tok_s'] or 0:,.1f} tok/s", flush=True)
    t0 = time.perf_counter()
    preempt0 = engine.scheduler.num_preemptions
    mixed = drive(engine, [prompts[n] for n in lengths], args.decode_tokens)
    wall = time.perf_counter() - t0
    res["mixed"] = {"wall_s": wall, "requests": {str(r["prompt_tokens"]): r for r in mixed},
                    "prompt_tok_s": sum(lengths) / wall,
                    "preemptions": engine.scheduler.num_preemptions - preempt0}
    print(f"mixed batch of {len(lengths)}: {wall:.1f} s, "
          f"{res['mixed']['preemptions']} preemptions", flush=True)
    res["batch_decode"] = batch_decode(engine, config, res, args, rng)
    if args.profile_steps != 0:  # a decode step at the decode context; a prefill step
        steps = min(6 if args.profile_steps is None else args.profile_steps, PROFILE_TAIL - 8)
        res["decode_profile"] = profile_step(engine, config, args, rng, prompt_len=ctx,
                                             reps=steps, decode=True)
        res["prefill_profile"] = profile_step(engine, config, args, rng, prompt_len=3 * t,
                                              reps=1, decode=False)
        if args.dump_hlo:
            for key in ("decode_profile", "prefill_profile"):
                add_sources(res[key], args.dump_hlo)
    res["memory_end"] = device_memory()
    res["compiles_after_warmup"] = engine.compile_count - warm
    engine.bm.check()  # page tables and pools agree
    res["pages_in_use_after"] = engine.bm.num_used_pages  # no prefix cache: 0 unless leaked
    every = list(res["alone"].values()) + mixed
    res["all_completed"] = all(r["finish_reason"] == "length" and r["error"] is None
                               and r["output_tokens"] == args.decode_tokens for r in every)
    if res["alone"]:
        res["mixed_vs_alone"] = {str(r["prompt_tokens"]): compare_logprobs(
            r, res["alone"][str(r["prompt_tokens"])]) for r in mixed}
        res["mixed_matches_alone"] = judge_logprobs(res["mixed_vs_alone"])
    return res


def table(res: dict) -> str:
    gib = 2**30
    lines = [f"{res['mesh']} on {res['num_devices']} x {res['device']}, {res['layers']} layers, "
             f"{res['dtype']}{' + ' + res['quantization'] if res.get('quantization') else ''}, "
             f"attention {res['impl']}; warm-up {res['warmup_s']:.0f} s "
             f"({res['compiles_warmup']} compiles), compiles after warm-up: "
             f"{res['compiles_after_warmup']}, all completed: {res['all_completed']}, "
             f"KV pages in use after: {res.get('pages_in_use_after', '-')}", "",
             f"read bandwidth {res.get('read_bytes_s', 0) / 1e12:.2f} TB/s (device 0, same run); "
             f"mixed matches alone (logprobs): {res.get('mixed_matches_alone', '-')}", "",
             "| prompt | alone TTFT s | prefill tok/s | MFU | decode tok/s | decode ms/step | "
             "roofline ms | ratio | mixed TTFT s | mixed decode tok/s | mixed vs alone: chosen "
             "token's max dlogprob |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, spec: "-" if x is None else format(x, spec)
    for n in res["lengths"]:
        a = res["alone"].get(str(n), {})
        m = res["mixed"]["requests"].get(str(n), {})
        ms, roof = a.get("decode_ms_per_step"), a.get("roofline_ms")
        cmp = res.get("mixed_vs_alone", {}).get(str(n), {})
        flip = "" if cmp.get("flipped_at") is None else f" (flip at {cmp['flipped_at']})"
        lines.append(f"| {n} | {f(a.get('ttft_s'), '.2f')} | {f(a.get('prefill_tok_s'), ',.0f')} | "
                     f"{f(a.get('mfu'), '.1%')} | {f(a.get('decode_tok_s'), ',.1f')} | "
                     f"{f(ms, '.2f')} | {f(roof, '.2f')} | "
                     f"{f(ms / roof if ms and roof else None, '.2f')} | "
                     f"{f(m.get('ttft_s'), '.2f')} | {f(m.get('decode_tok_s'), ',.1f')} | "
                     f"{f(cmp.get('max_abs_diff'), '.3f')}{flip} |")
    if res.get("batch_decode"):
        lines += ["", "| batch x context | ms/step | output tok/s | roofline ms | ratio | "
                  "host's wait for the device, ms/step |", "|---|---|---|---|---|---|"]
        for r in res["batch_decode"]:
            if "skipped" in r:
                lines.append(f"| {r['batch']} x {r['context']} | skipped: {r['skipped']} "
                             "| | | | |")
                continue
            lines.append(f"| {r['batch']} x {r['context']} | {f(r['ms_per_step'], '.2f')} | "
                         f"{f(r['output_tok_s'], ',.0f')} | {r['roofline_ms']:.2f} | "
                         f"{f(r['ratio_to_roofline'], '.2f')} | "
                         f"{f(r.get('device_wait_ms_per_step'), '.2f')} |")
    peaks = [d["peak_bytes_in_use"] for d in res["memory_end"] if d["peak_bytes_in_use"]]
    if peaks:
        lines += ["", f"peak memory per device: {min(peaks) / gib:.1f}-{max(peaks) / gib:.1f} GiB "
                  f"(limit {res['memory_end'][0]['bytes_limit'] / gib:.1f} GiB)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_environment(args.dry_run, args.dump_hlo)
    res = run(args)
    print(table(res), flush=True)
    quant = (f"-{args.quantization}{'-attn' if args.fp8_attention else ''}"
             if args.quantization else "")
    name = f"multigpu-{res['date']}{'-dryrun' if args.dry_run else ''}{quant}{args.tag}.json"
    for d in {args.out, os.environ.get("OUT") or None} - {None}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as fh:
            json.dump(res, fh, indent=2)
    print(f"wrote {os.path.join(args.out, name)}", flush=True)
    ok = (res["all_completed"] and res["compiles_after_warmup"] == 0
          and res["pages_in_use_after"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
