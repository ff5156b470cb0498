"""``python -m jaxattn.plan_memory``: per-device memory of a Llama 4 deployment, before buying it.

    python -m jaxattn.plan_memory                                  # Scout on the usual meshes
    python -m jaxattn.plan_memory --config scout -tp 4 --gpu h200 --max-model-len 262144
    python -m jaxattn.plan_memory --config /path/to/checkpoint -tp 8 --device-memory 72GiB

Prints weights / KV cache / activations per device and the KV capacity in tokens
(``jaxattn.serve.memory_plan`` says how each is computed). With a mesh given it
exits 1, with the reason, when that configuration cannot run; the engine refuses
the same configurations at start-up with the same message. Runs on any machine:
it needs no device and no checkpoint (only a config).
"""

from __future__ import annotations

import argparse
import sys

from jaxattn.serve.config import PARALLEL_FIELDS, add_engine_args, config_from_args

# The default table: Scout on the meshes it is served on, at the engine's long-context shape.
STANDARD = (("h100", 8, 1), ("h100", 2, 4), ("h100", 4, 1), ("h200", 2, 1), ("h200", 4, 1),
            ("h200", 8, 1))
# With FP8 weights (~108 GB for Scout) one GPU is worth asking about: an H200 fits, an H100 not.
STANDARD_FP8 = (("h100", 1, 1), ("h200", 1, 1), ("h100", 2, 1), ("h200", 2, 1))


# The engine flags that change memory, with the long-context deployment's defaults.
FIELDS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size",
          "kv_cache_memory", "dtype", "kv_cache_dtype", "quantization", *PARALLEL_FIELDS,
          "device_memory")
DEFAULTS = dict(max_model_len=131072, max_num_batched_tokens=8192, dtype="bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxattn.plan_memory",
                                description="Per-device memory plan of a Llama 4 deployment.")
    p.add_argument("--config", default="scout",
                   help="a fixture name (scout), a config.json or a checkpoint directory")
    p.add_argument("--gpu", choices=["h100", "h200"], default=None,
                   help="plan for this GPU's memory (times --memory-fraction)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="fraction of the GPU XLA may use (default: XLA_PYTHON_CLIENT_MEM_FRACTION "
                   "or JAX's 0.75)")
    add_engine_args(p, fields=FIELDS, defaults=DEFAULTS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxattn.parallel import ParallelConfig
    from jaxattn.serve import kv_cache as cache
    from jaxattn.serve import memory_plan as memory

    engine = config_from_args(args)
    try:
        config = memory.named_config(args.config)
        kw = dict(dtype=engine.dtype, kv_dtype=engine.kv_cache_dtype,
                  max_num_seqs=engine.max_num_seqs,
                  max_num_batched_tokens=engine.max_num_batched_tokens,
                  max_model_len=engine.max_model_len, page_size=engine.page_size,
                  kv_cache_memory=engine.kv_cache_memory, quantization=engine.quantization)
        explicit = (engine.tensor_parallel_size, engine.expert_parallel_size, args.gpu,
                    engine.device_memory) != (1, 1, None, None)
        if not explicit:
            fractions = sorted({memory.mem_fraction() if args.memory_fraction is None
                                else args.memory_fraction, 0.9})
            plans = [memory.gpu_plan(config, ParallelConfig(tensor=tp, expert=ep), gpu,
                                     fraction=f, **kw)
                     for f in fractions
                     for gpu, tp, ep in (STANDARD_FP8 if engine.quantization else STANDARD)]
            print(f"{args.config}: per device; max_model_len {engine.max_model_len:,}, "
                  f"{engine.max_num_batched_tokens:,} tokens per step, {engine.max_num_seqs} "
                  f"sequences, {engine.dtype} weights"
                  f"{' (' + engine.quantization + ' experts and MLPs)' if engine.quantization else ''}"
                  f" and {engine.kv_cache_dtype or engine.dtype} "
                  "KV cache. XLA may use the given fraction of each GPU "
                  "(XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default is 0.75).\n")
            print(memory.table(plans))
            return 0
        if engine.device_memory is not None:
            plan = memory.plan(config, engine.parallel,
                               usable=cache.parse_budget(engine.device_memory), **kw)
        else:
            plan = memory.gpu_plan(config, engine.parallel, args.gpu or "h100",
                                   fraction=args.memory_fraction, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(memory.describe(plan))
    if not plan.fits:
        print(f"error: {plan.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
