"""Serving benchmark: jaxattn's HTTP server under a bounded loopback load, and transformers'
continuous batching (``generate_batch``) on the same model and weights, in one run.

    python -m benchmarks.serving              # on the GPU (benchmarks/gpu.sh serving)
    python -m benchmarks.serving --smoke      # a few requests on the CPU, embedded tiny model

1. A Llama 4 with Scout's layer structure and vocabulary at a size one GPU holds, seeded
   random weights (bf16), is written once as a Hugging Face directory (subprocess).
2. ``python -m jaxattn.serve --model DIR`` starts (subprocess); the load generator sends a
   fixed number of requests with random prompt lengths over loopback, streaming:
   * ``burst``: all at once with one output length (the workload ``generate_batch`` runs),
   * ``poisson``: Poisson arrivals at ``--rate`` with random output lengths.
   It records time to first token (TTFT), inter-token latency (ITL, per token) and
   throughput, and checks that the server compiled nothing while serving.
3. transformers loads the same directory and runs ``generate_batch`` on the burst workload.

Writes ``benchmarks/results/serving.json`` (and prints a table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import wait_healthy, write_json

# Scout's structure (3 chunked-local RoPE layers then 1 global NoPE, MoE with 16 experts
# top-1 + shared expert, 202048-token vocabulary, 5:1 GQA, head_dim 128) at ~1.4B parameters.
BENCH_CONFIG = {
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 202048,
    "hidden_size": 2048, "intermediate_size": 1024, "intermediate_size_mlp": 4096,
    "num_hidden_layers": 4, "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 8192, "initializer_range": 0.02,
    "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 5,
    "tie_word_embeddings": False, "num_experts_per_tok": 1, "num_local_experts": 16,
    "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layers": [1, 1, 1, 0],
    "layer_types": ["chunked_attention"] * 3 + ["full_attention"], "attention_chunk_size": 8192,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
    "attention_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "dtype": "bfloat16",
}


def make_model(path: str) -> None:
    """Write the benchmark model (random weights) with the embedded model's tokenizer files."""
    import jax.numpy as jnp

    from jaxattn.models import llama4
    from jaxattn.serve import default_model

    default_model.build_tokenizer(path)  # ids >= its 1024 tokens decode to nothing: fine here
    config = llama4.Llama4Config.from_hf_dict(BENCH_CONFIG)
    llama4.save(llama4.init_random(config, seed=0, dtype=jnp.bfloat16), path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 5}, f)


# Workload ------------------------------------------------------------------------------------
def workload(n, prompt_len, output_len, rate, seed):
    """(arrival offset s, prompt ids, max_tokens) per request; rate None: all at t=0."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    outs = rng.integers(output_len[0], output_len[1] + 1, n)
    gaps = rng.exponential(1.0 / rate, n) if rate else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    # Ids of ordinary (non-special) tokens of the tokenizer, so prompts decode as text.
    return [(float(a), rng.integers(6, 1000, int(l)).tolist(), int(o))
            for a, l, o in zip(arrivals, lens, outs)]


def _pct(xs, qs=(50, 90, 99)):
    return {f"p{q}": (float(np.percentile(xs, q)) if len(xs) else None) for q in qs}


async def run_load(url: str, reqs, concurrency: int) -> dict:
    """Send ``reqs`` (streaming completions) at their arrival times; measure per-token timing."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    results = []

    async def one(client, arrival, prompt, max_tokens):
        await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
        async with sem:
            sent = time.perf_counter()
            times, tokens, status = [], 0, None
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    k = len(chunk["choices"][0].get("token_ids", [])) if chunk["choices"] else 0
                    if k:
                        times.append((time.perf_counter(), k))
                        tokens += k
            results.append({"sent": sent, "times": times, "tokens": tokens, "status": status,
                            "want": max_tokens})

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        await asyncio.gather(*(one(client, *r) for r in reqs))
    end = max(t for r in results for t, _ in r["times"]) if results else t0
    ttft = [r["times"][0][0] - r["sent"] for r in results if r["times"]]
    itl = []
    for r in results:
        for (a, _), (b, k) in zip(r["times"], r["times"][1:]):
            itl.extend([(b - a) / k] * k)
    out_tokens = sum(r["tokens"] for r in results)
    first = min(r["sent"] for r in results)
    return {
        "requests": len(results), "errors": sum(r["status"] != 200 for r in results),
        "incomplete": sum(r["tokens"] != r["want"] for r in results),
        "output_tokens": out_tokens, "seconds": end - first,
        "output_tok_per_s": out_tokens / (end - first), "ttft_s": _pct(ttft), "itl_s": _pct(itl),
        "e2e_s": _pct([r["times"][-1][0] - r["sent"] for r in results if r["times"]]),
    }


def _metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ours(args, model_dir, workloads) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jaxattn.serve", "--port", str(port), "--log-level", "warning",
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if model_dir:
        cmd += ["--model", model_dir]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", args.kv_cache_memory]
    if args.buckets:
        cmd += ["--buckets", args.buckets]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        wait_healthy(proc, url, args.start_timeout)
        out = {"startup_s": time.perf_counter() - t0}
        compiles = _metric(url, "jaxattn_compiles")
        # A short warm-up load (first-request effects: connection set-up, host caches).
        asyncio.run(run_load(url, workloads["burst"][:4], args.concurrency))
        for name, reqs in workloads.items():
            out[name] = asyncio.run(run_load(url, reqs, args.concurrency))
            print(f"jaxattn {name}: {json.dumps(out[name])}", flush=True)
        out["compiles_while_serving"] = _metric(url, "jaxattn_compiles") - compiles
        out["preemptions"] = _metric(url, "jaxattn_num_preemptions_total")
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_transformers(model_dir: str, reqs) -> dict:
    """transformers' own continuous batching on the burst workload (one output length)."""
    # transformers probes for a package named `kernels`: with the repo root on sys.path it
    # would find this project's kernels/ folder (jaxattn.kernels) instead.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from transformers import AutoConfig

    # transformers' continuous batching (5.17) rejects Llama 4's "chunked_attention" layers
    # ("Invalid group type"). Below attention_chunk_size tokens a chunked-local layer sees
    # exactly what a full-attention layer sees, so with every sequence that short the model
    # run as all-full-attention is the same model: same weights, same outputs.
    config = AutoConfig.from_pretrained(model_dir)
    longest = max(len(p) + m for _, p, m in reqs)
    assert longest <= config.attention_chunk_size, (longest, config.attention_chunk_size)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    model = None
    for impl in ("paged|sdpa", "sdpa_paged"):
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=config,
                                                         dtype=torch.bfloat16,
                                                         attn_implementation=impl).cuda().eval()
            break
        except Exception as e:  # noqa: BLE001 - the name changed across versions
            print(f"transformers: attn_implementation={impl!r} failed: {e}", flush=True)
    if model is None:
        raise RuntimeError("no paged attention implementation in this transformers")
    max_new = reqs[0][2]
    # Random weights over a 202048-token vocabulary: EOS (2 ids) is practically never drawn,
    # so every request generates max_new tokens, as ours do with ignore_eos.
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=5)
    prompts = [p for _, p, _ in reqs]

    def run(inputs):
        try:
            return model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False,
                                        record_timestamps=True)
        except TypeError:  # older signature
            return model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False)

    # No torch.inference_mode() here: generate_batch's worker thread resets static tensors
    # made during the warm-up, which fails on inference tensors ("Inplace update to
    # inference tensor outside InferenceMode"); generate_batch disables grad itself.
    run(prompts[:4])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = run(prompts)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    ttft = []
    for o in outs.values():
        ts = getattr(o, "timestamps", None)
        if ts:
            ttft.append(ts[0] - t0)
    return {"version": transformers.__version__, "attn_implementation": impl,
            "note": "chunked_attention layers run as full attention (identical below "
                    f"{config.attention_chunk_size} tokens; longest sequence {longest})",
            "requests": len(outs), "output_tokens": tokens, "seconds": dt,
            "output_tok_per_s": tokens / dt, "ttft_s": _pct(ttft) if ttft else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, few requests")
    p.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--rate", type=float, default=16.0, help="Poisson arrivals per second")
    p.add_argument("--prompt-len", default="64:512")
    p.add_argument("--output-len", default="32:256", help="poisson workload output lengths")
    p.add_argument("--burst-output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-memory", default="8GiB")
    p.add_argument("--buckets", default="32,128,256,1024")
    p.add_argument("--start-timeout", type=float, default=180)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--deadline", type=float, default=280,
                   help="seconds the whole run may take (transformers is skipped if short)")
    args = p.parse_args(argv)
    if args.make_model:
        make_model(args.make_model)
        return 0
    if args.smoke:
        args.requests, args.rate, args.prompt_len, args.output_len = 8, 20.0, "4:40", "4:16"
        args.burst_output_len, args.max_model_len, args.max_num_seqs = 8, 256, 8
        args.max_num_batched_tokens, args.kv_cache_memory, args.buckets = 64, None, "16,64"
        args.skip_transformers = True
    span = lambda s: tuple(int(x) for x in s.split(":"))
    workloads = {
        "burst": workload(args.requests, span(args.prompt_len),
                          (args.burst_output_len, args.burst_output_len), None, seed=0),
        "poisson": workload(args.requests, span(args.prompt_len), span(args.output_len),
                            args.rate, seed=1),
    }
    model_dir = None
    t0 = time.perf_counter()
    if not args.smoke:
        model_dir = "/tmp/jaxattn-bench-llama4"
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            subprocess.run([sys.executable, "-m", "benchmarks.serving", "--make-model", model_dir],
                           check=True)
    result = {"config": {k: v for k, v in vars(args).items() if k != "make_model"},
              "model": None if args.smoke else BENCH_CONFIG, "model_write_s": time.perf_counter() - t0}
    name = "serving-smoke.json" if args.smoke else "serving.json"

    def save():  # after each part, so a run cut short still leaves what it measured
        write_json(name, result)

    result["jaxattn"] = run_ours(args, model_dir, workloads)
    save()
    if not args.skip_transformers:
        if time.perf_counter() - t0 > args.deadline - 90:
            result["transformers"] = {"error": "skipped: not enough time left in --deadline"}
        else:
            try:
                result["transformers"] = run_transformers(model_dir, workloads["burst"])
            except Exception as e:  # noqa: BLE001 - report, keep our numbers
                result["transformers"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"transformers: {json.dumps(result['transformers'])}", flush=True)
        save()
    _table(result)
    return 0


def _table(r: dict) -> None:
    ours, hf = r["jaxattn"], r.get("transformers") or {}
    f = lambda x: "-" if x is None else f"{x:.3f}"
    print("\n| run | requests | out tok/s | TTFT p50 s | TTFT p99 s | ITL p50 s | ITL p99 s |")
    print("|---|---|---|---|---|---|---|")
    for name in ("burst", "poisson"):
        o = ours[name]
        print(f"| jaxattn {name} | {o['requests']} | {o['output_tok_per_s']:.0f} | "
              f"{f(o['ttft_s']['p50'])} | {f(o['ttft_s']['p99'])} | {f(o['itl_s']['p50'])} | "
              f"{f(o['itl_s']['p99'])} |")
    if "output_tok_per_s" in hf:
        t = hf["ttft_s"] or {}
        print(f"| transformers generate_batch burst | {hf['requests']} | "
              f"{hf['output_tok_per_s']:.0f} | {f(t.get('p50'))} | {f(t.get('p99'))} | - | - |")
        if hf.get("output_tok_per_s"):
            print(f"\nthroughput ratio (burst): "
                  f"{ours['burst']['output_tok_per_s'] / hf['output_tok_per_s']:.2f}x")
    print(f"compiles while serving: {ours['compiles_while_serving']:.0f}; "
          f"server start-up {ours['startup_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
