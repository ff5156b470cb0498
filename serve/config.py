"""One frozen :class:`EngineConfig` for everything an engine is built from.

``python -m jaxattn.serve``, ``python -m jaxattn.generate``, ``python -m jaxattn.plan_memory``
and ``jaxattn.LLM(...)`` all build one: each field is one CLI flag (``max_num_seqs`` is
``--max-num-seqs``) and one ``LLM`` keyword, and :func:`add_engine_args` makes the flags
from the fields, so the three never drift apart. The engine's static attention
:class:`~jaxattn.Bounds` come from it in one place (:meth:`EngineConfig.bounds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import jaxattn
from jaxattn.kv_quant import FP8_PAGE_MULTIPLE
from jaxattn.parallel import ParallelConfig

DTYPES = ("bfloat16", "float16", "float32")
QUANTIZATIONS = ("fp8",)
# "auto": the weights' dtype; "fp8": float8_e4m3fn pages with a scale per token and KV head
# (jaxattn.kv_quant), half the bytes of bf16 plus 3%.
KV_CACHE_DTYPES = ("auto", "bf16", *DTYPES, "fp8")
DEFAULT_PAGE_SIZE = {False: 16, True: 32}  # by "is the KV cache FP8"
MAX_BLOCK_KV = 128  # keys per KV tile the kernels take at most (bf16 and FP8 caches alike)
ATTENTION_IMPLS = ("auto", "reference", "executor", "mosaic")
GROUPED_MATMUL_IMPLS = ("auto", "xla", "mosaic")
DEFAULT_MAX_MODEL_LEN = 8192  # when the model allows more and none is asked for
# Decode steps of one device call at most: a burst's tokens wait for its last step.
MAX_SCHEDULER_STEPS = 32


def _flag(default, help: str, *, flags: tuple[str, ...] = (), **argparse_kw):
    """A field with its CLI flag: ``--field-name`` plus ``flags`` (aliases), argparse options."""
    return dataclasses.field(default=default, metadata=dict(help=help, flags=flags,
                                                            argparse=argparse_kw))


def _buckets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = _flag(
        None, "Hugging Face Llama 4 directory (config, safetensors, tokenizer files); default: a "
        "tiny random-weight model built offline")
    max_model_len: int | None = _flag(
        None, "longest sequence (prompt + output) in tokens; default: the model's "
        f"max_position_embeddings, at most {DEFAULT_MAX_MODEL_LEN}", type=int)
    max_num_seqs: int = _flag(64, "sequences per engine step", type=int)
    max_num_batched_tokens: int = _flag(
        2048, "tokens per engine step (the token budget; largest compiled bucket)", type=int)
    page_size: int | None = _flag(
        None, "tokens per KV cache page (default 16; 32 with --kv-cache-dtype fp8, whose pages "
        "must be a multiple of 32 tokens)", type=int)
    kv_cache_memory: str | float | int | None = _flag(
        None, "KV cache budget per device: bytes (e.g. 4GiB) or a fraction of free device memory "
        "(default: 0.8 on a GPU; on the CPU, room for max-num-seqs full sequences)")
    dtype: str | None = _flag(None, "weights dtype (default: bfloat16 on a GPU, float32 on CPU)",
                              choices=DTYPES)
    kv_cache_dtype: str | None = _flag(
        None, "KV cache dtype: auto (the weights' dtype, the default), bf16/bfloat16, float16, "
        "float32, or fp8 (float8_e4m3fn with a float32 scale per token and KV head: ~1.94x the "
        "tokens of bf16)", choices=KV_CACHE_DTYPES)
    quantization: str | None = _flag(
        None, "fp8: float8_e4m3fn weights with per-output-channel scales for the routed experts, "
        "shared expert and dense MLPs (quantised while loading; activations per token at run "
        "time); --dtype is then everything else's. Compressed-tensors FP8 checkpoints load "
        "in FP8 without it", choices=QUANTIZATIONS)
    buckets: tuple[int, ...] | None = _flag(
        None, "comma-separated step token counts to compile (default: powers of two from 16 up "
        "to --max-num-batched-tokens, which must be the largest)", type=_buckets)
    enable_prefix_caching: bool = _flag(
        True, "share KV pages between prompts with a common prefix",
        action=argparse.BooleanOptionalAction)
    async_scheduling: bool = _flag(
        True, "enqueue the next step while the device computes this one (off: wait for each "
        "step's tokens before scheduling the next)", action=argparse.BooleanOptionalAction)
    num_scheduler_steps: int = _flag(
        1, "decode steps per device call for small decode batches (those of the smallest "
        "bucket, no logit processing, nothing waiting to be admitted): the host's per-call "
        "work, which sets batch 1's pace at full size, is paid once for all of them. Tokens "
        "reach the client in bursts of this many; a stop ends a sequence mid-burst and its "
        "later draws are dropped", type=int)
    attention_impl: str = _flag("auto", "attention implementation (auto: the Mosaic GPU kernels "
                                "on Hopper)", flags=("--impl",), choices=ATTENTION_IMPLS)
    grouped_matmul_impl: str = _flag(
        "auto", "routed experts' grouped matmul (auto: the Mosaic GPU kernel on Hopper)",
        choices=GROUPED_MATMUL_IMPLS)
    seed: int = _flag(0, "seed for requests that give none", type=int)
    tensor_parallel_size: int = _flag(
        1, "devices the attention heads and MLP columns are split over", flags=("-tp",), type=int)
    expert_parallel_size: int = _flag(
        1, "devices the routed experts are split over; attention is split over tensor x expert "
        "devices, so TP x EP must divide the query heads and divide the KV heads or be a "
        "multiple of them (KV heads are then replicated)", flags=("-ep",), type=int)
    data_parallel_size: int = _flag(
        1, "independent replicas (each on TP x EP devices, its own KV cache)", flags=("-dp",),
        type=int)
    device_memory: str | int | None = _flag(
        None, "bytes XLA may use per device (e.g. 72GiB) for the start-up memory check and "
        "--plan-memory (default: what the runtime reports; unknown on the CPU)")
    # A start-up compiles one step per bucket; cached, a restart of the same configuration
    # (and the same jax) loads them from disk instead (jaxattn.compile_cache).
    compilation_cache_dir: str | None = _flag(
        None, "JAX persistent compilation cache: compiled steps are kept here and reused by the "
        "next start-up (default: $JAXATTN_COMPILE_CACHE or ~/.cache/jaxattn/jax-compile; "
        "'none' turns it off)")

    def __post_init__(self):
        if isinstance(self.kv_cache_dtype, str):  # one spelling per cache dtype
            kv = self.kv_cache_dtype.lower()
            kv = {"auto": None, "bf16": "bfloat16", "fp8_e4m3": "fp8",
                  "float8_e4m3fn": "fp8"}.get(kv, kv)
            object.__setattr__(self, "kv_cache_dtype", kv)
        if self.page_size is None:
            object.__setattr__(self, "page_size", DEFAULT_PAGE_SIZE[self.kv_cache_dtype == "fp8"])
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ValueError(f"num_scheduler_steps must be in [1, {MAX_SCHEDULER_STEPS}], got "
                             f"{self.num_scheduler_steps}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        for name, allowed in (("dtype", DTYPES), ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("quantization", QUANTIZATIONS),
                              ("attention_impl", ATTENTION_IMPLS),
                              ("grouped_matmul_impl", GROUPED_MATMUL_IMPLS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.kv_cache_dtype == "fp8" and self.page_size % FP8_PAGE_MULTIPLE:
            raise ValueError(f"kv_cache_dtype=fp8 needs page_size a multiple of "
                             f"{FP8_PAGE_MULTIPLE} (the kernels copy each page's scale row into "
                             f"a 128-byte aligned slot), got {self.page_size}")
        if self.buckets is not None:
            b = tuple(self.buckets)
            if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"buckets must be distinct positive token counts in increasing "
                                 f"order, got {b}")
            if b[-1] != self.max_num_batched_tokens:
                raise ValueError(f"the largest bucket must be max_num_batched_tokens="
                                 f"{self.max_num_batched_tokens}, got {b}")
            object.__setattr__(self, "buckets", b)
        ParallelConfig(tensor=self.tensor_parallel_size, expert=self.expert_parallel_size,
                       data=self.data_parallel_size)  # a clear error for bad sizes

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tensor=self.tensor_parallel_size, expert=self.expert_parallel_size,
                              data=self.data_parallel_size)

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """The step token counts compiled at warm-up: ``buckets`` or the default ladder."""
        return self.buckets or bucket_ladder(self.max_num_batched_tokens)

    def resolved_max_model_len(self, model_max: int) -> int:
        return self.max_model_len or min(model_max, DEFAULT_MAX_MODEL_LEN)

    def bounds(self, model_config, model_parallel: int = 1, **tuning) -> jaxattn.Bounds:
        """The static :class:`jaxattn.Bounds` of this engine for a Llama 4 config.

        ``model_parallel``: devices the attention heads are split over (tensor x expert
        parallel); the bounds then count one device's heads, which is what its kernels see
        inside ``shard_map``. ``tuning`` passes Bounds' tuning fields (block_q, ...) through.
        """
        from jaxattn.models.llama4 import local_heads

        hq, hkv = local_heads(model_config, model_parallel)
        chunked = any(model_config.is_chunked(i) for i in range(model_config.num_hidden_layers))
        chunk = model_config.attention_chunk_size if chunked else None
        tuning.setdefault("block_kv", default_block_kv(chunk, self.page_size))
        return jaxattn.Bounds(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.resolved_max_model_len(model_config.max_position_embeddings),
            page_size=self.page_size, num_q_heads=hq, num_kv_heads=hkv,
            head_dim=model_config.head_dim, chunk_size=chunk, **tuning)


def bucket_ladder(max_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Token-count buckets: powers of two from ``smallest`` up to, and ending at, ``max_tokens``."""
    out, b = [], min(smallest, max_tokens)
    while b < max_tokens:
        out.append(b)
        b *= 2
    return tuple(out) + (max_tokens,)


def default_block_kv(chunk_size: int | None, page_size: int) -> int:
    """The largest KV tile of whole pages, up to :data:`MAX_BLOCK_KV` keys, that divides the
    chunk (Bounds' rules); larger pages are cut into ``MAX_BLOCK_KV``-key slices.

    A chunk that is no multiple of the page size (a few tokens: any valid Llama 4 config
    serves) gets the largest slice of a page that divides both, ``gcd(chunk, page_size)``:
    chunk-aligned key ranges then start on a tile. The Mosaic kernels take no such tile
    (``kernels.unsupported_reason``), so ``impl="auto"`` runs those bounds on the reference.
    """
    if page_size > MAX_BLOCK_KV and page_size % MAX_BLOCK_KV == 0 and (
            chunk_size is None or chunk_size % MAX_BLOCK_KV == 0):
        return MAX_BLOCK_KV  # a slice of a page per tile (one TMA copy)
    for pages in range(max(1, MAX_BLOCK_KV // page_size), 0, -1):
        if chunk_size is None or chunk_size % (pages * page_size) == 0:
            return pages * page_size
    return math.gcd(chunk_size, page_size)


# The command line ----------------------------------------------------------------------
PARALLEL_FIELDS = ("tensor_parallel_size", "expert_parallel_size", "data_parallel_size")


def add_engine_args(parser: argparse.ArgumentParser, *, fields=None, defaults=None) -> None:
    """One flag per :class:`EngineConfig` field (``fields``: only these), with the field's
    default unless ``defaults`` gives another."""
    defaults = defaults or {}
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if fields is not None and f.name not in fields:
            continue
        meta = f.metadata
        kw = dict(meta["argparse"])
        default = defaults.get(f.name, f.default)
        if kw.get("action") is argparse.BooleanOptionalAction:
            kw["help"] = meta["help"] + f" (default: {'on' if default else 'off'})"
        else:
            kw["help"] = meta["help"]
        group.add_argument("--" + f.name.replace("_", "-"), *meta["flags"], dest=f.name,
                           default=default, **kw)
    if fields is None or "enable_prefix_caching" in fields:  # the flag's earlier spelling
        group.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                           action="store_false", help=argparse.SUPPRESS)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Multi-host start-up (not engine configuration: it happens before any engine exists)."""
    g = parser.add_argument_group("multi-host")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize (cluster auto-detected, or "
                   "--coordinator-address/--num-processes/--process-id) before building the mesh")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The :class:`EngineConfig` of parsed flags; a bad combination exits with a one-line error."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        return EngineConfig(**{**values, **overrides})
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when ``--distributed`` asks for it (before any device use)."""
    if args.distributed:
        from jaxattn import parallel

        parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
