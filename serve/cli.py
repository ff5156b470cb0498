"""What the command lines share: engine flags, ``--plan-memory`` and a start-up that fails
with one line instead of a traceback.

``python -m jaxattn.serve`` and ``python -m jaxattn.generate`` call :func:`add_args`
and :func:`start_engine`; ``python -m jaxattn.plan_memory`` uses the same engine flags
(:func:`jaxattn.serve.config.add_engine_args`).
"""

from __future__ import annotations

import argparse

from jaxattn.serve.config import (EngineConfig, add_distributed_args, add_engine_args,
                                  config_from_args, initialize_distributed)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Every engine flag, multi-host start-up and ``--plan-memory``."""
    add_engine_args(parser)
    add_distributed_args(parser)
    parser.add_argument("--plan-memory", action="store_true",
                        help="print the per-device memory plan (weights, KV cache, activations, "
                        "KV capacity) for these settings and exit, without loading the weights")


def start_engine(args: argparse.Namespace, *, metrics=None):
    """Build and warm up the engine the flags describe (``--plan-memory``: print the plan and
    exit). A bad configuration exits with a one-line error."""
    initialize_distributed(args)  # jax.distributed before anything touches a device
    config = config_from_args(args)
    if args.plan_memory:
        raise SystemExit(print_memory_plan(config))
    from jaxattn import compile_cache
    from jaxattn.serve.engine import LLMEngine

    compile_cache.enable(config.compilation_cache_dir)  # before the warm-up compiles
    try:
        engine = LLMEngine.from_config(config, metrics=metrics)
        engine.warmup()
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    except Exception as e:  # e.g. device out of memory for an impossible configuration
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            raise SystemExit(f"error: the device ran out of memory at start-up ({str(e)[:300]}); "
                             "lower --kv-cache-memory, --max-num-batched-tokens or --max-num-seqs")
        raise
    return engine


def print_memory_plan(config: EngineConfig) -> int:
    """``--plan-memory``: the plan for ``config``, without loading anything; 0 if it fits."""
    import jax

    from jaxattn.models import llama4
    from jaxattn.serve import default_model, memory_plan
    from jaxattn.serve.engine import check_model_dir

    try:
        check_model_dir(config.model)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    model_config = llama4.Llama4Config.from_pretrained(config.model or
                                                       default_model.default_model_dir())
    dtype = config.dtype or ("bfloat16" if jax.devices()[0].platform == "gpu" else "float32")
    try:
        plan = memory_plan.for_engine(model_config, config, dtype=dtype,
                                      usable=config.device_memory)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if plan is None:
        raise SystemExit("error: this device does not report its memory; pass --device-memory "
                         "(e.g. 72GiB) to plan for a GPU")
    print(memory_plan.describe(plan))
    return 0 if plan.fits else 1
