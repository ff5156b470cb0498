"""``python -m jaxattn.serve``: the OpenAI-compatible HTTP server.

With no ``--model`` it serves the embedded tiny Llama 4 with random weights
(built offline on first use), so it runs on a fresh CPU machine.
"""

import argparse
import logging
import os
import signal
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's size knobs, shared with ``python -m jaxattn.generate``."""
    p.add_argument("--model", default=None, help="Hugging Face Llama 4 directory (config, "
                   "safetensors, tokenizer files); default: a tiny random-weight model built offline")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + output) in tokens; default: the model's "
                   "max_position_embeddings, at most 8192")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per engine step (the token budget; largest compiled bucket)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget: bytes (e.g. 4GiB) or a fraction of free device memory "
                   "(default: 0.8 on a GPU; on the CPU, room for max-num-seqs full sequences)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--buckets", default=None,
                   help="comma-separated step token counts to compile (default: powers of two "
                   "from 16 up to --max-num-batched-tokens, which must be the largest)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="weights and KV cache dtype (default: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "executor", "mosaic"],
                   help="attention implementation (auto: the Mosaic GPU kernels on Hopper)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share KV pages between prompts with a common prefix")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that give none")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next (default: "
                        "enqueue the next step while the device computes this one)")
    add_parallel_args(p)
    p.add_argument("--device-memory", default=None,
                   help="bytes XLA may use per device (e.g. 72GiB) for the start-up memory check "
                   "and --plan-memory (default: what the runtime reports; unknown on the CPU)")
    p.add_argument("--plan-memory", action="store_true",
                   help="print the per-device memory plan (weights, KV cache, activations, KV "
                   "capacity) for these settings and exit, without loading the weights")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Mesh sizes (also used by ``python -m jaxattn.plan_memory``)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices the attention heads and MLP columns are split over")
    p.add_argument("--expert-parallel-size", "-ep", type=int, default=1,
                   help="devices the routed experts are split over; attention is split over "
                   "tensor x expert devices, so TP x EP must divide the KV heads (8 for Scout)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="independent replicas (each on TP x EP devices, its own KV cache)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize (cluster auto-detected, or "
                   "--coordinator-address/--num-processes/--process-id) before building the mesh")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def parallel_from_args(args):
    """ParallelConfig from the flags (after jax.distributed when asked); SystemExit if invalid."""
    from jaxattn import parallel

    if args.distributed:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    try:
        return parallel.ParallelConfig(tensor=args.tensor_parallel_size,
                                       expert=args.expert_parallel_size,
                                       data=args.data_parallel_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def print_memory_plan(args, pc) -> int:
    """``--plan-memory``: the plan for these flags, without loading anything; 0 if it fits."""
    from jaxattn.models import llama4
    from jaxattn.models.llama4 import memory
    from jaxattn.serve import default_model
    from jaxattn.serve.model_runner import EngineShape, memory_plan

    model_dir = args.model or default_model.default_model_dir()
    config = llama4.Llama4Config.from_pretrained(model_dir)
    shape = EngineShape(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        page_size=args.page_size, kv_cache_memory=args.kv_cache_memory)
    dtype = args.dtype or ("bfloat16" if _on_gpu() else "float32")
    try:
        plan = memory_plan(config, pc, shape, dtype=dtype, usable=args.device_memory)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if plan is None:
        raise SystemExit("error: this device does not report its memory; pass --device-memory "
                         "(e.g. 72GiB) to plan for a GPU")
    print(memory.describe(plan))
    return 0 if plan.fits else 1


def _on_gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxattn.serve",
                                description="Serve a Llama 4 model over an OpenAI-compatible HTTP API.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the directory's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def engine_from_args(args, **kw):
    """Build and warm up the engine; a bad configuration is a one-line error, not a traceback."""
    from jaxattn.serve.engine import LLMEngine
    from jaxattn.serve.model_runner import EngineShape

    shape = EngineShape(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        page_size=args.page_size, kv_cache_memory=args.kv_cache_memory)
    if args.buckets:
        try:
            kw["buckets"] = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            raise SystemExit(f"error: --buckets must be comma-separated ints, got {args.buckets!r}")
    pc = parallel_from_args(args)
    if args.plan_memory:
        raise SystemExit(print_memory_plan(args, pc))
    try:
        engine = LLMEngine.from_pretrained(
            args.model, shape, dtype=args.dtype, impl=args.impl, seed=args.seed,
            enable_prefix_caching=not args.no_prefix_caching, parallel=pc,
            async_scheduling=not args.no_async_scheduling, device_memory=args.device_memory, **kw)
        engine.warmup()
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    except Exception as e:  # e.g. device out of memory for an impossible configuration
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            raise SystemExit(f"error: the device ran out of memory at start-up ({str(e)[:300]}); "
                             "lower --kv-cache-memory, --max-num-batched-tokens or --max-num-seqs")
        raise
    return engine


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.distributed and not args.plan_memory:
        # Every process of a multi-host mesh must issue the same steps in the same order;
        # requests reaching one process's HTTP server would not. Offline generation runs the
        # same input on every process, so it can.
        raise SystemExit("error: --distributed serving is not supported: run one server per "
                         "host (--data-parallel-size within it), or python -m jaxattn.generate "
                         "--distributed with the same input on every process")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # its backend probing is noise here
    import uvicorn

    from jaxattn.serve.api_server import build_app
    from jaxattn.serve.async_engine import AsyncEngine
    from jaxattn.serve.metrics import EngineMetrics

    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model))
                                      if args.model else "jaxattn-tiny-llama4-random")
    metrics = EngineMetrics(name)
    engine = engine_from_args(args, metrics=metrics)
    b = engine.bounds
    print(f"jaxattn: serving {name!r} ({engine.model_dir}) on http://{args.host}:{args.port} — "
          f"max_model_len={b.max_model_len}, max_num_seqs={b.max_num_seqs}, "
          f"max_num_batched_tokens={b.max_num_batched_tokens}, {engine.runner.num_pages} KV pages "
          f"of {b.page_size} tokens", file=sys.stderr, flush=True)
    app = build_app(AsyncEngine(engine), model_name=name, metrics=metrics)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, stops the engine (the app's
    # lifespan), then re-raises the signal to the handler it found. Finding this one, a server
    # that shut down cleanly exits with status 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
