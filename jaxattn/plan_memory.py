"""``python -m jaxattn.plan_memory``: per-device memory of a Llama 4 deployment, before buying it.

    python -m jaxattn.plan_memory                                  # Scout on the usual meshes
    python -m jaxattn.plan_memory --config scout -tp 4 --gpu h200 --max-model-len 262144
    python -m jaxattn.plan_memory --config /path/to/checkpoint -tp 8 --device-memory 72GiB

Prints weights / KV cache / activations per device and the KV capacity in tokens
(``jaxattn.models.llama4.memory`` says how each is computed). With a mesh given it
exits 1, with the reason, when that configuration cannot run; the engine refuses
the same configurations at start-up with the same message. Runs on any machine:
it needs no device and no checkpoint (only a config).
"""

from __future__ import annotations

import argparse
import sys

# The default table: Scout on the meshes it is served on, at the engine's long-context shape.
STANDARD = (("h100", 8, 1), ("h100", 2, 4), ("h100", 4, 1), ("h200", 2, 1), ("h200", 4, 1),
            ("h200", 8, 1))


def build_parser() -> argparse.ArgumentParser:
    from jaxattn.serve.__main__ import add_parallel_args

    p = argparse.ArgumentParser(prog="python -m jaxattn.plan_memory",
                                description="Per-device memory plan of a Llama 4 deployment.")
    p.add_argument("--config", default="scout",
                   help="a fixture name (scout), a config.json or a checkpoint directory")
    add_parallel_args(p)
    p.add_argument("--gpu", choices=["h100", "h200"], default=None,
                   help="plan for this GPU's memory (times --memory-fraction)")
    p.add_argument("--device-memory", default=None,
                   help="bytes XLA may use per device (e.g. 72GiB); overrides --gpu")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="fraction of the GPU XLA may use (default: XLA_PYTHON_CLIENT_MEM_FRACTION "
                   "or JAX's 0.75)")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV budget per device as the engine takes it (default: the engine's rule)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxattn import cache
    from jaxattn.models.llama4 import memory
    from jaxattn.parallel import ParallelConfig

    try:
        config = memory.named_config(args.config)
        kw = dict(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, page_size=args.page_size,
                  kv_cache_memory=args.kv_cache_memory)
        explicit = (args.tensor_parallel_size, args.expert_parallel_size, args.gpu,
                    args.device_memory) != (1, 1, None, None)
        if not explicit:
            fractions = sorted({memory.mem_fraction() if args.memory_fraction is None
                                else args.memory_fraction, 0.9})
            plans = [memory.gpu_plan(config, ParallelConfig(tensor=tp, expert=ep), gpu,
                                     fraction=f, **kw)
                     for f in fractions for gpu, tp, ep in STANDARD]
            print(f"{args.config}: per device; max_model_len {args.max_model_len:,}, "
                  f"{args.max_num_batched_tokens:,} tokens per step, {args.max_num_seqs} sequences, "
                  f"{args.dtype} weights and KV cache. XLA may use the given fraction of each GPU "
                  "(XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default is 0.75).\n")
            print(memory.table(plans))
            return 0
        pc = ParallelConfig(tensor=args.tensor_parallel_size, expert=args.expert_parallel_size,
                            data=args.data_parallel_size)
        if args.device_memory is not None:
            plan = memory.plan(config, pc, usable=cache.parse_budget(args.device_memory), **kw)
        else:
            plan = memory.gpu_plan(config, pc, args.gpu or "h100",
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
