"""The device side of the engine: a model, the paged KV cache it owns, and its jitted step.

The engine talks to a model only through :class:`ModelRunner`: the static bounds, the
size of the page pool, the compiled token buckets, ``warmup()``, and ``step(seqs, rows)``,
which packs the scheduled sequences into a static-shape batch, runs the model over the
cache, samples one token per sequence and returns the draws (still on the device).
:class:`Llama4Runner` runs ``jaxattn.models.llama4``; a test may pass any other runner
with the same surface.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import NamedTuple, Protocol, Sequence

import jax
import numpy as np

from jaxattn import kernels
from jaxattn.models import llama4
from jaxattn.models.llama4 import sharding
from jaxattn.planner import Bounds
from jaxattn.serve import kv_cache as kv_cache_lib
from jaxattn.serve import memory_plan, paged_step, sampling
from jaxattn.serve.batch import SeqStep, StepBatch, build_step
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.sampling_params import MAX_LOGPROBS

log = logging.getLogger("jaxattn.serve")

# (temperature, top_k, top_p, seed, index, position): one sequence's sampling row.
SamplingRow = tuple[float, int, float, int, int, int]


class PromptLogprobs(NamedTuple):
    """Scores of a step's positions (on the device until fetched), one row per new token."""

    logprobs: jax.Array  # f32 [T]: of each row's target token
    top_ids: jax.Array  # int32 [T, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32 [T, MAX_LOGPROBS]


class ModelRunner(Protocol):
    bounds: Bounds  # static limits; every step is padded to them
    num_pages: int  # pages in the global layers' KV pool the runner owns
    num_chunked_pages: int  # pages in the chunked-local layers' pool (0: no such layers)
    vocab_size: int
    buckets: tuple[int, ...]  # the step token counts compiled at warm-up

    def warmup(self, progress: bool = True) -> None:
        """Compile the step for every bucket and the sampler for every mode."""
        ...

    def step(self, seqs: Sequence[SeqStep], rows: Sequence[SamplingRow], *,
             want_logprobs: bool = False,
             prev_tokens: jax.Array | None = None,
             processing: sampling.Processing | None = None,
             seeds: Sequence[sampling.PenaltySeed] = ()) -> sampling.Sampled:
        """Run one step over ``seqs`` and draw a token per sequence with its ``rows[i]``.

        Returns the draws on the device (rows past ``len(seqs)`` meaningless); updates
        the KV cache in place. A token id ``-(r + 1)`` in a sequence stands for
        ``prev_tokens[r]`` (int32 [S] on the device: the previous step's draws, not yet
        on the host). ``processing`` (only passed when some row needs it): penalties,
        logit bias, min_p and grammar masks; ``seeds``: penalty-table rows to write first
        (sampling.PenaltySeed; their ``pending_row`` indexes ``prev_tokens``)."""
        ...

    # Optional: a runner without it serves no request that asks for prompt logprobs.
    # def prompt_logprobs(self, targets: Sequence[int]) -> PromptLogprobs:
    #     """For the step just run: per new token t (in step order), the logprob of
    #     ``targets[t]`` (-1: not wanted) and the top MAX_LOGPROBS there, on the device."""


class Llama4Runner:
    """A Llama 4 checkpoint (or an initialised model) with its page pool and jitted step.

    A model whose weights are on a mesh (``model.mesh``) runs tensor / expert
    parallel: its bounds count one device's heads and its pools are split by KV head.
    """

    def __init__(self, model, config: EngineConfig, *, num_pages: int | None = None,
                 num_chunked_pages: int | None = None):
        """``num_pages`` overrides the global pool's size that ``config.kv_cache_memory`` would
        buy; ``num_chunked_pages`` the chunked one's (default with ``num_pages``: the memory
        planner's rule, ``min(num_pages, bounds.chunked_pages_for(max_num_seqs))``)."""
        mc = model.config
        mesh = model.mesh
        n = sharding.group_size(mesh)
        self.config = config
        self.bounds = config.bounds(mc, model_parallel=n)
        self.buckets = config.token_buckets
        dtype = config.kv_cache_dtype or model.dtype
        one_page = paged_step.cache_spec(mc, num_pages=1, num_chunked_pages=1,
                                         page_size=config.page_size, dtype=dtype,
                                         model_parallel=n)
        pc = sharding.parallel_config(mesh)
        step_bytes = memory_plan.activation_bytes(
            mc, pc, num_tokens=config.max_num_batched_tokens, num_seqs=config.max_num_seqs,
            dtype=model.dtype, quantization="fp8" if model.fp8 else None) \
            + memory_plan.DEFAULT_RESERVE
        devices = list(mesh.local_devices) if mesh is not None else [jax.devices()[0]]
        b = self.bounds
        has_chunked = bool(one_page.chunked_layers)
        if num_pages:
            need = b.chunked_pages_for(b.max_num_seqs) if has_chunked else 0
            self.num_pages = num_pages
            self.num_chunked_pages = (num_chunked_pages if num_chunked_pages is not None
                                      else min(num_pages, need))
        else:
            self.num_pages, self.num_chunked_pages = memory_plan.num_pages_for(
                config.kv_cache_memory, one_page, b, devices=devices, step_bytes=step_bytes)
        self.spec = dataclasses.replace(one_page, num_pages=self.num_pages,
                                        num_chunked_pages=self.num_chunked_pages)
        self.vocab_size = mc.vocab_size
        self.model = model
        self.mesh = mesh
        if config.attention_impl == "auto" and kernels.on_hopper():
            why = kernels.unsupported_reason(self.bounds, model.dtype, self.spec.dtype)
            if why:  # e.g. chunks of a few tokens: served, but not at the kernels' speed
                log.warning("attention runs on the pure-JAX reference: the Mosaic kernels "
                            "cannot serve these bounds (%s)", why)
        # The smallest bucket may be compiled for decode rows only (steps with a longer row
        # take the next one): a decode step then launches no prefill kernel.
        self.decode_only_bucket = paged_step.decode_only_bucket(
            self.buckets, self.bounds, config.attention_impl, model.dtype, self.spec.dtype)
        self._step = paged_step.make_step_fn(
            model, self.bounds, impl=config.attention_impl, gmm_impl=config.grouped_matmul_impl,
            return_hidden=True, quantized_kv=self.spec.quantized, reuse_outputs=True,
            decode_only_tokens=(self.decode_only_bucket,) if self.decode_only_bucket else ())
        self._prompt_head = paged_step.make_prompt_logprobs_fn(
            model, min(MAX_LOGPROBS, mc.vocab_size))
        self._hidden = None  # the last step's hidden states [T, hidden] (on the device)
        self._kv_sharding = None if mesh is None else sharding.kv_sharding(mesh)
        self._scale_sharding = None if mesh is None else sharding.kv_scale_sharding(mesh)
        self._kv = self._allocate()
        # Token counts of the penalized sequences (sampling.PenaltyState): one row per
        # sequence a step can hold, ~max_num_seqs x vocab x 4 bytes (logits' size).
        self.num_penalty_slots = config.max_num_seqs
        self._rep_sharding = (None if mesh is None else jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        self._penalties = sampling.new_penalty_state(self.num_penalty_slots, mc.vocab_size,
                                                     self._rep_sharding)
        self._no_prev = jax.device_put(np.zeros(config.max_num_seqs, np.int32),
                                       self._rep_sharding)
        log.info("KV cache: %d global + %d chunked-local pages of %d tokens (%.1f MiB per device, "
                 "%s)%s", self.num_pages, self.num_chunked_pages,
                 config.page_size, self.spec.total_bytes / 2**20, self.spec.dtype,
                 "" if mesh is None else f"; {pc.describe()} over {mesh.size} devices")

    @classmethod
    def from_pretrained(cls, model_dir: str, config: EngineConfig, *, mesh=None, dtype=None):
        """Load a checkpoint onto ``mesh`` (one replica; None: one device).

        Before anything is read the configuration is checked: the split must divide
        the model and the memory plan must fit the device (``config.device_memory``:
        bytes XLA may use per device; default: what the runtime reports). Raises
        ValueError with a one-line reason otherwise.
        """
        from jaxattn.models.llama4.quantization import checkpoint_scheme

        dtype = dtype or config.dtype
        mc = llama4.Llama4Config.from_pretrained(model_dir)
        if config.quantization is None and checkpoint_scheme(model_dir) is not None:
            config = config.replace(quantization="fp8")  # an FP8 checkpoint loads as FP8
        plan = memory_plan.for_engine(mc, config, dtype=dtype or "bfloat16",
                                      usable=config.device_memory,
                                      devices=None if mesh is None else mesh.devices.flat)
        if plan is not None and not plan.fits:
            raise ValueError(plan.reason)
        return cls(llama4.load(model_dir, dtype=dtype, mesh=mesh,
                               quantization=config.quantization), config)

    # The step --------------------------------------------------------------------------
    def bucket_for(self, num_tokens: int, decode_rows_only: bool = False) -> int:
        """The smallest bucket that holds ``num_tokens``; the decode-only one only for a
        step whose sequences all have at most ``bounds.dq`` new tokens."""
        for b in self.buckets:
            if b >= num_tokens and (decode_rows_only or b != self.decode_only_bucket):
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.buckets[-1]}")

    def build(self, num_tokens: int, seqs: Sequence[SeqStep]) -> StepBatch:
        """The static-shape batch of ``seqs`` padded to ``num_tokens`` (a bucket)."""
        if num_tokens == self.decode_only_bucket and not self._decode_rows_only(seqs):
            raise ValueError(f"the {num_tokens}-token step is compiled for decode rows only "
                             f"(at most {self.bounds.dq} new tokens per sequence)")
        return build_step(self.bounds, num_tokens, seqs, num_pages=self.num_pages,
                          num_chunked_pages=self.num_chunked_pages or self.num_pages)

    def _decode_rows_only(self, seqs: Sequence[SeqStep]) -> bool:
        return all(len(s.token_ids) <= self.bounds.dq for s in seqs)

    def forward(self, batch: StepBatch, prev_tokens: jax.Array | None = None) -> jax.Array:
        """The model over a built batch: logits [max_num_seqs, vocab] f32 (on the device)."""
        logits, self._hidden, self._kv = self._step(self._kv, batch, prev_tokens)
        return logits

    def prompt_logprobs(self, targets: Sequence[int]) -> PromptLogprobs:
        """Scores of the step just run (see :class:`ModelRunner`): ``targets`` has one entry
        per new token of that step, -1 where nothing is wanted."""
        t = self._hidden.shape[0]
        padded = np.full(t, -1, np.int32)
        padded[:len(targets)] = targets
        return PromptLogprobs(*self._prompt_head(self._hidden, padded))

    def step(self, seqs: Sequence[SeqStep], rows: Sequence[SamplingRow], *,
             want_logprobs: bool = False,
             prev_tokens: jax.Array | None = None,
             processing: sampling.Processing | None = None,
             seeds: Sequence[sampling.PenaltySeed] = ()) -> sampling.Sampled:
        num_tokens = sum(len(s.token_ids) for s in seqs)
        batch = self.build(self.bucket_for(num_tokens, self._decode_rows_only(seqs)), seqs)
        logits = self.forward(batch, prev_tokens)
        params = sampling.SamplingBatch.build(list(rows), self.bounds.max_num_seqs)
        if processing is None:
            return sampling.draw(logits, params, want_logprobs, len(rows))
        return self._draw_processed(logits, params, processing, seeds, prev_tokens,
                                    want_logprobs, len(rows))

    def multi_step(self, seqs: Sequence[SeqStep], rows: Sequence[SamplingRow], num_steps: int,
                   *, prev_tokens: jax.Array | None = None
                   ) -> tuple[sampling.Sampled, jax.Array]:
        """``num_steps`` decode steps of ``seqs`` (one new token each, pages for
        ``num_steps``) in one device call, each step's draws the next one's tokens -> (the
        draws, each field [num_steps, S], with top logprobs; the last step's tokens [S]), on
        the device. Step i draws with ``rows`` at their position + i. For at most
        :attr:`multi_step_rows` sequences without logit processing; the sampler works on
        their own rows (:func:`sampling.sampler_rows`), as a single step's does."""
        if not 0 < len(seqs) <= self.multi_step_rows:
            raise ValueError(f"multi_step takes 1 to {self.multi_step_rows} sequences, got "
                             f"{len(seqs)}")
        # The smallest bucket: with the kernels, the one compiled for decode rows only.
        batch = self.build(self.buckets[0], seqs)
        params = sampling.SamplingBatch.build(list(rows), self.bounds.max_num_seqs)
        drawn, last, self._kv = self._step.multi(self._kv, batch, prev_tokens, params,
                                                 num_steps, _burst_mode(params),
                                                 rows=sampling.sampler_rows(
                                                     len(seqs), self.multi_step_rows))
        return drawn, last

    @property
    def multi_step_rows(self) -> int:
        """The most sequences :meth:`multi_step` takes: the smallest bucket's rows (its
        decode batches are the ones whose pace the host sets)."""
        return min(self.buckets[0], self.bounds.max_num_seqs)

    def _draw_processed(self, logits, params, processing, seeds, prev_tokens, want_logprobs,
                        live: int):
        prev = self._no_prev if prev_tokens is None else prev_tokens
        for args in sampling.seed_arrays(seeds, self.bounds.max_num_seqs,
                                         self.num_penalty_slots):
            self._penalties = sampling.seed_rows(self._penalties, *args, prev)
        sampled, self._penalties = sampling.draw_processed(logits, params, processing,
                                                           self._penalties, want_logprobs, live)
        return sampled

    def warmup(self, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        prev = None
        for bucket in tqdm(self.buckets, desc="compiling token buckets", unit="bucket",
                           disable=not progress):
            # One token in page 0: the pool is empty now and every page is fully rewritten
            # before a sequence reads it, so the warm-up's writes are harmless. Each bucket
            # runs alone and after a step (with its draws as prev_tokens), as steps do.
            batch = self.build(bucket, [SeqStep([0], 0, [0], [0])])
            for prev_tokens in (None, prev):
                logits = self.forward(batch, prev_tokens)
                prev = self._draw(logits, sampling.GREEDY_ROW, False).token_ids
            self.prompt_logprobs([-1])  # the prompt-logprob head of this bucket
        neutral = sampling.Processing.neutral(self.bounds.max_num_seqs, self.vocab_size,
                                              self.num_penalty_slots)
        seed = [sampling.PenaltySeed(self.num_penalty_slots - 1, [0], [0], 0)]
        for row, live, want_lp in itertools.product(
                WARMUP_ROWS, sampling.sampler_row_sizes(self.bounds.max_num_seqs), (False, True)):
            params = sampling.SamplingBatch.build([row], self.bounds.max_num_seqs)
            out = self._draw(logits, row, want_lp, live)
            # The processed sampler, with a seed after a step and without one.
            for p in (None, prev):
                out = self._draw_processed(logits, params, neutral, seed, p, want_lp, live)
        jax.block_until_ready(out)
        log.info("warm-up: %d buckets %s, %.1f s", len(self.buckets), self.buckets,
                 time.perf_counter() - t0)

    def warmup_multi_step(self, num_steps: int, progress: bool = True) -> None:
        """Compile :meth:`multi_step`'s loop of ``num_steps`` for every sampler mode and
        every number of rows its sampler may work on."""
        from tqdm.auto import tqdm

        prev = None
        rows = [r for r in WARMUP_ROWS if sampling.mode_of(
            sampling.SamplingBatch.build([r], 1)) in BURST_MODES]
        variants = list(itertools.product(
            rows, sampling.sampler_row_sizes(self.multi_step_rows)))
        for row, size in tqdm(variants, desc=f"compiling {num_steps}-step decode",
                              unit="variant", disable=not progress):
            # As warmup's steps: tokens in page 0, whose writes are harmless.
            for prev_tokens in (None, prev):
                _, prev = self.multi_step([SeqStep([0], 0, [0], [0])] * size, [row] * size,
                                          num_steps, prev_tokens=prev_tokens)
        jax.block_until_ready(prev)

    def _draw(self, logits, row: SamplingRow, want_logprobs: bool,
              live: int = 1) -> sampling.Sampled:
        return sampling.draw(logits, sampling.SamplingBatch.build([row], self.bounds.max_num_seqs),
                             want_logprobs, live)

    def recover_cache(self) -> bool:
        """After a failed step: rebuild the pools if the step consumed them; True if it did.

        The step donates the pools, so a failure after dispatch can leave them deleted;
        every later step would then fail. Rebuilding loses all cached K/V, which the
        engine answers by recomputing the running sequences.
        """
        if self._penalties.is_deleted():  # every row is reseeded when its sequence recomputes
            self._penalties = sampling.new_penalty_state(self.num_penalty_slots,
                                                         self.vocab_size, self._rep_sharding)
        if not any(x.is_deleted() for x in self._kv.arrays()):
            return False
        self._kv = self._allocate()
        return True

    def _allocate(self) -> kv_cache_lib.KVCache:
        return kv_cache_lib.allocate(self.spec, sharding=self._kv_sharding,
                                     scale_sharding=self._scale_sharding)


# The sampler modes a decode burst compiles a loop for. A "random" or "top_p" batch draws
# through the "filtered" loop: a row draws there exactly what it would in its own mode
# (sampling._sample), at the price of the threshold searches per step it skips there
# (sampling.filter_mask), and each loop is a compile of the whole step, one per mode and
# sampler row count (~24 s each at 12 of Scout's layers on an H100, session 48).
BURST_MODES = ("greedy", "filtered")


def _burst_mode(params: sampling.SamplingBatch) -> str:
    mode = sampling.mode_of(params)
    return mode if mode in BURST_MODES else "filtered"


# One row per sampler mode (sampling.MODES): greedy, random, top-p, filtered (top-k too).
WARMUP_ROWS: tuple[SamplingRow, ...] = (sampling.GREEDY_ROW, (1.0, 0, 1.0, 0, 0, 0),
                                        (1.0, 0, 0.9, 0, 0, 0), (1.0, 5, 0.9, 0, 0, 0))

