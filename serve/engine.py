"""The engine loop: the scheduler decides, the runner executes, the output processor reports.

One step: :class:`~jaxattn.serve.scheduler.Scheduler` picks the sequences and their new
tokens (admission, token budget, chunked prefill, preemption); the
:class:`~jaxattn.serve.model_runner.ModelRunner` packs them into a static-shape batch,
runs the model over the paged cache and samples; the
:class:`~jaxattn.serve.output_processor.OutputProcessor` detokenises each token and
decides stops; the engine turns that into :class:`~jaxattn.serve.outputs.Delta` s.

Async scheduling (the default): a step is enqueued on the device and the host
goes on to schedule and enqueue the next one before the first one's tokens are
back. A decoding sequence's next input token is then still on the device: the
batch names it by its row in the previous step's draws, and the model step reads
it there. The host learns the tokens one step late, so a sequence that stops on
a token has one extra token computed (and dropped); one whose length limit is
reached is not scheduled again. Without it, the device idles while the host
prepares every step, and at small batches the host's time per step is about the
device's (benchmarks/NOTES-model.md).

:class:`LLMEngine` is synchronous and single-threaded: whoever owns it calls
``add_request`` / ``abort`` / ``step``. The offline API drives it directly; the
server drives it from one engine thread (:mod:`jaxattn.serve.async_engine`).

Logit processing (penalties, ``logit_bias``, ``min_tokens``, ``min_p``, structured
output) rides in the step as fixed-shape arrays (:class:`~jaxattn.serve.sampling.Processing`),
only when some sampling row needs it. A structured output's grammar needs every token of
its sequence before it can give the mask of the next one, so a step that samples a
constrained sequence whose last token is still in flight first lands the step before
(synchronous for that step: the host computes the masks from the landed tokens, then
enqueues). Penalties need no such wait: their counts live on the device
(:mod:`jaxattn.serve.sampling`).

Static shapes: a step's token count is rounded up to a fixed ladder of
buckets and its sequences padded to ``max_num_seqs``, so the model step
compiles once per bucket and the sampler once per mode, all during :meth:`warmup`.
Compiles are counted (JAX's backend-compile events on the threads that run
the engine); after warm-up the count must not move.

Every way a sequence ends (stop, length, abort, error) goes through
``Scheduler.finish``, which frees its pages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import random
import sys
import threading
import time
from typing import Sequence as Seq

import jax
import numpy as np

from jaxattn.serve import sampling
from jaxattn.serve.batch import SeqStep
from jaxattn.serve.block_manager import BlockManager
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.model_runner import Llama4Runner, ModelRunner, SamplingRow
from jaxattn.serve.output_processor import OutputProcessor
from jaxattn.serve.outputs import Delta, TokenLogprob
from jaxattn.serve import sampling_params as sampling_params_lib
from jaxattn.serve.sampling_params import SamplingParams
from jaxattn.serve.scheduler import Scheduled, Scheduler
from jaxattn.serve.sequence import Sequence, Status
from jaxattn.serve import structured
from jaxattn.serve.tokenizer import Tokenizer

log = logging.getLogger("jaxattn.serve")

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_F32_MAX = float(np.finfo(np.float32).max)


class CompileCounter:
    """Counts the XLA backend compiles that happen while an engine works (a jax.monitoring
    listener, installed once, crediting the engine running on the compiling thread)."""

    _local = threading.local()
    _lock = threading.Lock()
    _installed = False

    def __init__(self):
        self.count = 0
        self._install()

    @classmethod
    def _install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **_) -> None:
        counter = getattr(cls._local, "active", None)
        if event == _BACKEND_COMPILE and counter is not None:
            counter.count += 1

    @contextlib.contextmanager
    def active(self):
        """Credit compiles on this thread to this counter while inside."""
        prev = getattr(self._local, "active", None)
        self._local.active = self
        try:
            yield
        finally:
            self._local.active = prev


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's state: what the metrics gauges and data parallelism read."""

    num_running: int
    num_waiting: int
    num_pages: int  # the global layers' pool: the cache's capacity in pages
    num_used_pages: int
    num_free_pages: int
    num_chunked_pages: int  # the chunked-local layers' pool (live chunks; 0 without them)
    num_used_chunked_pages: int
    prefix_cache_hit_tokens: int  # since start
    num_steps: int
    compile_count: int
    # Seconds the engine's thread has waited for steps' results from the device since start.
    # ~0 a step: the host, not the device, sets the pace (its step work is not hidden).
    device_wait_s: float = 0.0

    @staticmethod
    def total(parts: Seq["EngineStats"]) -> "EngineStats":
        return EngineStats(*(sum(getattr(p, f.name) for p in parts)
                             for f in dataclasses.fields(EngineStats)))


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None,
                 config: EngineConfig | None = None, *, metrics=None,
                 num_pages: int | None = None, num_chunked_pages: int | None = None,
                 free_chunked_pages: bool = True):
        """``config``: the engine's own settings (prefix caching, seed, async scheduling);
        default: the runner's. ``num_pages`` / ``num_chunked_pages``: use only the first
        pages of the runner's global / chunked-local pool (default: all).
        ``free_chunked_pages=False`` keeps every chunked-layer page of a sequence (the
        non-hybrid cache, what tests compare the hybrid one against)."""
        config = config or getattr(runner, "config", None) or EngineConfig()
        b = runner.bounds
        self.runner, self.tokenizer, self.bounds, self.config = runner, tokenizer, b, config
        self.max_model_len = b.max_model_len
        num_pages = runner.num_pages if num_pages is None else num_pages
        if not b.pages_per_seq <= num_pages <= runner.num_pages:
            raise ValueError(f"num_pages={num_pages} must hold one max_model_len sequence "
                             f"({b.pages_per_seq} pages) and fit the pool ({runner.num_pages})")
        num_chunked = getattr(runner, "num_chunked_pages", 0)
        num_chunked = num_chunked if num_chunked_pages is None else num_chunked_pages
        one = b.chunk_pages_per_seq if free_chunked_pages else b.pages_per_seq
        if num_chunked and not one <= num_chunked <= runner.num_chunked_pages:
            raise ValueError(f"num_chunked_pages={num_chunked} must hold one sequence's live "
                             f"chunk and step ({one} pages) and fit the pool "
                             f"({runner.num_chunked_pages})")
        # A kernel KV block's pages kept consecutive (one TMA copy each in the kernels).
        self.bm = BlockManager(num_pages, b.page_size,
                               enable_prefix_caching=config.enable_prefix_caching,
                               num_chunked_pages=num_chunked,
                               chunk_size=b.chunk_size if free_chunked_pages else None,
                               run_pages=max(1, b.block_kv // b.page_size))
        self.scheduler = Scheduler(self.bm, max_num_seqs=b.max_num_seqs,
                                   max_num_batched_tokens=b.max_num_batched_tokens)
        self.output = OutputProcessor(tokenizer, b.max_model_len)
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else frozenset()
        self.grammars = (structured.GrammarBackend(tokenizer, runner.vocab_size)
                         if tokenizer is not None else None)
        # Rows of the runner's penalty table (sampling.PenaltyState): free ones, and who holds
        # the others. A sequence holds one while it runs and a later owner reseeds it.
        num_slots = getattr(runner, "num_penalty_slots", 0)
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_owner: dict[int, Sequence] = {}
        self.metrics = None
        if metrics is not None:
            self.attach_metrics(metrics)
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._compiles = CompileCounter()
        self.async_scheduling = config.async_scheduling
        self._inflight: _InFlight | None = None
        self._reported_hits = 0  # prefix-cache hit tokens already reported to the metrics
        self.num_steps = 0
        self.device_wait_s = 0.0  # EngineStats.device_wait_s
        self.warmed_up = False
        self.model_dir: str | None = None
        # The model's generation_config.json sampling defaults (jaxattn.serve.generation_config):
        # the front-ends apply them to the fields a request leaves out.
        self.generation_defaults: dict = {}

    @classmethod
    def from_config(cls, config: EngineConfig, *, metrics=None):
        """Tokenizer + Llama 4 runner for ``config.model`` (None: the embedded tiny
        random-weight model, announced on stderr), on the devices ``config`` asks for.

        With ``data_parallel_size > 1`` the result is a
        :class:`~jaxattn.serve.data_parallel.DataParallelEngine` of that many replicas.
        """
        from jaxattn import parallel as parallel_lib
        from jaxattn.serve import allocator, default_model, generation_config

        if allocator.vmm_active() and jax.default_backend() == "gpu":
            log.warning("XLA_PYTHON_CLIENT_ALLOCATOR=vmm: XLA remaps every weight array around "
                        "each step, ~30 ms of host time per decode step at full size; XLA's "
                        "default allocator does not (serve/allocator.py)")
        model_dir = config.model
        check_model_dir(model_dir)
        if model_dir is None:
            print(default_model.RANDOM_WEIGHTS_NOTICE, file=sys.stderr, flush=True)
            model_dir = default_model.default_model_dir()
        if config.dtype is None:  # bf16 where it is fast; f32 on the CPU
            config = config.replace(
                dtype="bfloat16" if jax.devices()[0].platform == "gpu" else "float32")
        pc = config.parallel
        meshes = (parallel_lib.replica_meshes(parallel_lib.make_mesh(pc)) if pc.world > 1
                  else [None])
        tokenizer = Tokenizer(model_dir)
        engines = []
        for mesh in meshes:
            runner = Llama4Runner.from_pretrained(model_dir, config, mesh=mesh)
            engine = cls(runner, tokenizer, config,
                         metrics=metrics if len(meshes) == 1 else None)
            engine.model_dir = model_dir
            engine.generation_defaults = generation_config.sampling_defaults(model_dir)
            engines.append(engine)
        if len(engines) == 1:
            return engines[0]
        from jaxattn.serve.data_parallel import DataParallelEngine

        return DataParallelEngine(engines, metrics=metrics)

    def attach_metrics(self, metrics) -> None:
        """Report to ``metrics`` (an :class:`~jaxattn.serve.metrics.EngineMetrics`)."""
        metrics.bind(self)
        self.metrics = metrics

    # Requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """ValueError if the request can never run (pure: safe from any thread)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.runner.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        want = n + (params.max_tokens or 1)
        if want > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {want} tokens ({n} in the prompt, {params.max_tokens or 1} in the "
                "completion). Please reduce the length of the prompt or max_tokens.")
        if params.n > self.bounds.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.bounds.max_num_seqs}")
        if params.prompt_logprobs is not None and not hasattr(self.runner, "prompt_logprobs"):
            raise ValueError("this engine's model runner cannot score prompts (prompt_logprobs)")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.min_tokens and not params.ignore_eos and (
                len(self.eos_token_ids | set(params.stop_token_ids))
                > sampling_params_lib.MAX_MIN_TOKENS_STOP_IDS):
            raise ValueError("min_tokens: too many stop token ids to hold back")
        if params.processes_logits and not getattr(self.runner, "num_penalty_slots", 0):
            raise ValueError("this model runner does not take penalties, logit_bias, min_p, "
                             "min_tokens or structured output")
        if params.structured_output is not None and self.grammars is None:
            raise ValueError("structured output needs a tokenizer")

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    *, arrival_time: float | None = None) -> None:
        self.validate(prompt_token_ids, params)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt)
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(next(self._seq_ids), request_id, i, prompt, params, seed, stop_ids,
                         max_tokens, arrival_time=now) for i in range(params.n)]
        if params.structured_output is not None:
            # The grammar is compiled once per request; each output walks its own copy.
            first = self.grammars.matcher(params.structured_output)
            for seq in seqs:
                seq.matcher = first if seq.index == 0 else first.deep_copy()
        self._requests[request_id] = seqs
        for seq in seqs:
            self.output.add(seq)
            self.scheduler.add(seq)
        if self.metrics:
            self.metrics.on_request(len(prompt))

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages; False if it is unknown (or already done)."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            self._finish(seq, "abort")
        if self.metrics:
            self.metrics.on_request_done(seqs)
        return True

    def has_unfinished(self) -> bool:
        flight = self._inflight
        return self.scheduler.has_work() or (
            flight is not None and any(not s.seq.finished for s in flight.live))

    def has_request(self, request_id: str) -> bool:
        """Whether the request is still running here (not finished, not aborted)."""
        return request_id in self._requests

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def compile_count(self) -> int:
        """XLA compiles this engine's warm-up and steps caused (constant after warm-up)."""
        return self._compiles.count

    # The loop ------------------------------------------------------------------------
    def warmup(self, progress: bool = True) -> None:
        """Compile the model step for every bucket and the sampler, before any request."""
        c0 = self.compile_count
        with self._compiles.active():
            self.runner.warmup(progress)
            n = self.config.num_scheduler_steps
            if n > 1 and hasattr(self.runner, "warmup_multi_step"):
                self.runner.warmup_multi_step(n, progress)
        self.warmed_up = True
        log.info("warm-up: %d compiles", self.compile_count - c0)

    def stats(self) -> EngineStats:
        """A snapshot (reads of ints and list lengths: safe from any thread)."""
        bm = self.bm
        return EngineStats(num_running=len(self.scheduler.running),
                           num_waiting=len(self.scheduler.waiting),
                           num_pages=bm.glob.num_pages,
                           num_used_pages=bm.glob.num_pages - len(bm.glob.free),
                           num_free_pages=len(bm.glob.free),
                           num_chunked_pages=bm.chunked.num_pages if bm.chunked else 0,
                           num_used_chunked_pages=bm.num_used_chunked_pages,
                           prefix_cache_hit_tokens=bm.prefix_hits, num_steps=self.num_steps,
                           compile_count=self.compile_count, device_wait_s=self.device_wait_s)

    def step(self) -> list[Delta]:
        """One engine step; returns what each touched sequence gained.

        With async scheduling the step is enqueued on the device and the call returns
        the tokens of the step before it (which the device finished meanwhile): the host
        schedules and dispatches step n+1 while the device computes step n.
        """
        with self._compiles.active():
            return self._step()

    def _step(self) -> list[Delta]:
        out = self.scheduler.schedule()
        if self.metrics and out.preempted:
            self.metrics.on_preempt(len(out.preempted))
        prev, self._inflight = self._inflight, None
        deltas: list[Delta] = []
        scheduled = out.scheduled
        if prev is not None and any(s.samples and s.seq.matcher is not None
                                    and s.seq.num_inflight for s in scheduled):
            # A grammar's next mask needs the token in flight: land that step first (this
            # step is synchronous). Landing may finish scheduled sequences: they drop out.
            deltas += self._land(prev)
            prev = None
            scheduled = [s for s in scheduled if not s.seq.finished]
        flight = self._dispatch(scheduled, prev, deltas) if scheduled else None
        if prev is not None:
            deltas += self._land(prev)
        if flight is not None and not self.async_scheduling:
            deltas += self._land(flight)
        else:
            self._inflight = flight
        if flight is None and prev is None:
            self._report(0, 0)
        return deltas

    def _dispatch(self, scheduled: list[Scheduled], prev: _InFlight | None,
                  deltas: list[Delta]) -> _InFlight | None:
        """Build and enqueue a step (its draws stay on the device); failures go to ``deltas``."""
        t0 = time.perf_counter()
        # Host-side inputs, sequence by sequence: one whose own inputs cannot be built (a
        # bookkeeping bug, a parameter the sampler cannot take) fails alone and leaves the step.
        self._release_slots()
        live, steps, rows = [], [], []
        # Prompt scoring: per new token of the step, the prompt token that follows it (-1: not
        # wanted); and per scoring sequence (its index in live, first row, first position, rows).
        targets: list[int] = []
        scored: list[tuple[int, int, int, int]] = []
        for s in scheduled:
            seq = s.seq
            try:
                ids = seq.tokens[seq.num_computed:seq.num_computed + s.num_new]
                if len(ids) < s.num_new:  # the last one is still on the device: row r of the
                    ids = ids + [-1 - prev.rows[seq.seq_id]]  # previous step's draws is -(r+1)
                step = SeqStep(ids, seq.num_computed, self.bm.pages(seq.seq_id),
                               self.bm.chunked_pages(seq.seq_id))
                row = self._sampling_row(seq) if s.samples else sampling.GREEDY_ROW
            except Exception as e:
                log.exception("request %s failed", seq.request_id)
                deltas.append(self._fail(seq, f"{type(e).__name__}: {e}"))
                continue
            if seq.scores_prompt:
                first, n_prompt = seq.num_computed, seq.num_prompt_tokens
                count = max(0, min(first + s.num_new, n_prompt - 1) - first)
                if count:
                    scored.append((len(live), len(targets), first, count))
                targets += seq.prompt_token_ids[first + 1:first + 1 + count]
                targets += [-1] * (s.num_new - count)
            else:
                targets += [-1] * s.num_new
            live.append(s)
            steps.append(step)
            rows.append(row)
        if not live:
            return None
        num_tokens = sum(s.num_new for s in live)
        want_lp = any(s.samples and s.seq.params.logprobs for s in live)
        extra = {}
        try:
            if any(s.samples and s.seq.params.processes_logits for s in live):
                extra = self._processing(live, prev)
        except Exception as e:  # a grammar failed: the constrained sequences of the step fail
            deltas += self._step_failed([s.seq for s in live], e)
            return None
        burst = self._burst(live) if not (extra or scored) else 1
        try:
            prev_tokens = None if prev is None else prev.last_tokens
            if burst > 1:
                sampled, last = self.runner.multi_step(steps, rows, burst,
                                                       prev_tokens=prev_tokens)
                want_lp = True  # a burst's draws always carry their top logprobs
            else:
                sampled = self.runner.step(steps, rows, want_logprobs=want_lp,
                                           prev_tokens=prev_tokens, **extra)
                last = sampled.token_ids
            prompt_lp = self.runner.prompt_logprobs(targets) if scored else None
        except Exception as e:  # the whole step failed: its sequences fail, the engine goes on
            deltas += self._step_failed([s.seq for s in live], e)
            return None
        # Enqueued: the sequences move on now, so that the next step can be scheduled
        # before this one's tokens are known.
        for s in live:
            s.seq.num_computed += s.num_new + burst - 1
            s.seq.num_inflight += s.samples * burst
        return _InFlight(live, sampled, want_lp, num_tokens * burst, t0,
                         {s.seq.seq_id: i for i, s in enumerate(live)}, prompt_lp, scored,
                         burst, last)

    def _burst(self, live: list[Scheduled]) -> int:
        """Decode steps to run in one device call (``num_scheduler_steps``), or 1.

        A burst is for a small decode batch only: every sequence computes one token and
        draws the next without logit processing, has at least a burst's tokens left before
        ``max_tokens`` and ``max_model_len``, and the pages for them are free; and no request
        waits to be admitted (a burst would delay its first token by the whole burst). The
        pages are taken here."""
        n = self.config.num_scheduler_steps
        if (n == 1 or not hasattr(self.runner, "multi_step") or self.scheduler.waiting
                or len(live) > self.runner.multi_step_rows):
            return 1
        for s in live:
            seq = s.seq
            if (s.num_new != 1 or not s.samples or seq.params.processes_logits
                    or seq.max_tokens - seq.num_output_tokens - seq.num_inflight < n
                    or seq.num_computed + n > self.max_model_len):
                return 1
        wants = [(s.seq.seq_id, s.seq.num_computed + n) for s in live]
        if not self.bm.can_grow_all(wants):
            return 1
        for seq_id, num_tokens in wants:
            self.bm.grow(seq_id, num_tokens)
        return n

    def _land(self, flight: _InFlight) -> list[Delta]:
        """Bring a step's draws to the host: append, detokenize, stop, commit pages."""
        deltas: list[Delta] = []
        try:
            sampled, t0 = flight.sampled, time.perf_counter()
            tokens, lps = jax.device_get((sampled.token_ids, sampled.logprobs))
            self.device_wait_s += time.perf_counter() - t0
            top = (jax.device_get((sampled.top_ids, sampled.top_logprobs)) if flight.want_lp
                   else None)
            prompt_lp = (jax.device_get(tuple(flight.prompt_lp)) if flight.prompt_lp is not None
                         else None)
        except Exception as e:  # the step failed on the device
            return self._step_failed([s.seq for s in flight.live if not s.seq.finished], e)
        self.num_steps += flight.burst
        if prompt_lp is not None:
            self._score_prompts(flight, prompt_lp)
        if flight.burst == 1:  # as a burst of one: [1, S]
            tokens, lps = tokens[None], lps[None]
            top = None if top is None else (top[0][None], top[1][None])
        generated = 0
        for i, s in enumerate(flight.live):
            seq, mine = s.seq, []
            try:
                for j in range(flight.burst):
                    if seq.finished:  # aborted, failed or stopped while the step ran, or
                        break  # earlier in the burst: drop its later draws
                    seq.num_inflight -= s.samples
                    if self.bm.has(seq.seq_id):  # not preempted since
                        self.bm.commit(seq.seq_id, seq.tokens,
                                       min(seq.num_computed, seq.num_tokens))
                    if not s.samples:
                        continue
                    lp = None
                    if seq.params.logprobs is not None:
                        k = seq.params.logprobs
                        pairs = tuple((int(a), float(b)) for a, b in
                                      zip(top[0][j][i][:k], top[1][j][i][:k])) if k else ()
                        lp = TokenLogprob(int(tokens[j][i]), float(lps[j][i]), pairs)
                    mine.append(self._append(seq, int(tokens[j][i]), lp))
                    generated += 1
            except Exception as e:  # one sequence's bookkeeping failed: only it fails
                log.exception("request %s failed", seq.request_id)
                mine.append(self._fail(seq, f"{type(e).__name__}: {e}"))
            if mine:
                deltas.append(Delta.join(mine))
        self._report(flight.num_tokens, generated, time.perf_counter() - flight.t0)
        return deltas

    def _score_prompts(self, flight: _InFlight, prompt_lp) -> None:
        """File a step's prompt scores under the positions they belong to (before the draws
        land: the delta that carries a sequence's first token carries its prompt's scores)."""
        chosen, top_ids, top_lps = prompt_lp
        for i, row, first, count in flight.scored:
            seq = flight.live[i].seq
            if seq.finished or not seq.scores_prompt:
                continue
            k = seq.params.prompt_logprobs
            for j in range(row, row + count):
                pos = first + (j - row) + 1  # the prompt token scored by row j
                top = tuple(zip(top_ids[j][:k].tolist(), top_lps[j][:k].tolist()))
                seq.prompt_logprobs[pos] = TokenLogprob(seq.prompt_token_ids[pos],
                                                        float(chosen[j]), top)

    def _step_failed(self, seqs: list[Sequence], e: Exception) -> list[Delta]:
        log.exception("engine step failed")
        deltas = [self._fail(seq, f"engine step failed: {type(e).__name__}: {e}") for seq in seqs]
        if getattr(self.runner, "recover_cache", lambda: False)():
            # The failed step took the donated KV pools with it: nothing cached is valid,
            # so every other running sequence recomputes (outputs stay the same).
            self.bm.reset_prefix_cache()
            n = self.scheduler.preempt_all()
            log.warning("KV cache rebuilt after a failed step; %d sequences recompute", n)
        return deltas

    # Logit processing ---------------------------------------------------------------------
    def _release_slots(self) -> None:
        """Penalty-table rows of sequences that no longer run go back to the pool (a
        preempted sequence reseeds a row when it runs again)."""
        for slot, seq in list(self._slot_owner.items()):
            if seq.status is not Status.RUNNING:
                del self._slot_owner[slot]
                seq.penalty_slot = None
                self._free_slots.append(slot)

    def _processing(self, live: list[Scheduled], prev: _InFlight | None) -> dict:
        """The step's Processing arrays and penalty seeds (runner.step's keyword arguments)."""
        runner = self.runner
        proc = sampling.Processing.neutral(self.bounds.max_num_seqs, runner.vocab_size,
                                           runner.num_penalty_slots)
        seeds = []
        for i, s in enumerate(live):
            seq, p = s.seq, s.seq.params
            if not (s.samples and p.processes_logits):
                continue
            proc.presence[i], proc.frequency[i] = p.presence_penalty, p.frequency_penalty
            proc.repetition[i], proc.min_p[i] = p.repetition_penalty, p.min_p
            if p.penalized:
                if seq.penalty_slot is None:  # takes a row: seed it with the tokens so far
                    seq.penalty_slot = self._free_slots.pop()
                    self._slot_owner[seq.penalty_slot] = seq
                    pending = prev.rows[seq.seq_id] if seq.num_inflight and prev else None
                    seeds.append(sampling.PenaltySeed(seq.penalty_slot, seq.prompt_token_ids,
                                                      seq.output_token_ids, pending))
                proc.slot[i] = seq.penalty_slot
            bias = dict(p.logit_bias or {})
            position = seq.num_output_tokens + seq.num_inflight
            if position < p.min_tokens and seq.matcher is None:
                for t in seq.stop_ids:
                    bias[t] = -np.inf
            if bias:
                proc.bias_ids[i, :len(bias)] = list(bias)
                proc.bias_values[i, :len(bias)] = list(bias.values())
            if seq.matcher is not None:
                structured.fill_row(seq.matcher, proc.mask, i)
        return {"processing": proc, "seeds": seeds}

    # Per-sequence bookkeeping ---------------------------------------------------------
    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        # top_k >= vocab keeps every token (off), and any larger value would overflow the
        # sampler's int32 row; a temperature past float32's range is as flat as its maximum.
        top_k = p.top_k if p.top_k < self.runner.vocab_size else 0
        temperature = min(p.temperature, _F32_MAX)
        # The output index of the token drawn (one still in flight counts).
        position = seq.num_output_tokens + seq.num_inflight
        return (temperature, top_k, p.top_p, seq.seed, seq.index, position)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> Delta:
        now = time.monotonic()
        if self.metrics:
            if seq.first_token_time is None:
                self.metrics.on_first_token(now - seq.arrival_time)
            else:
                self.metrics.on_token(now - seq.last_token_time)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        seq.tokens.append(token)
        grammar_done = False
        if seq.matcher is not None and token not in seq.stop_ids:
            error = structured.consume(seq.matcher, token)
            if error is not None:
                return self._fail(seq, error)
            grammar_done = seq.matcher.is_stopped()  # complete: nothing may follow
        text, reason = self.output.on_token(seq, token, grammar_done=grammar_done)
        if reason is not None:
            self._finish(seq, reason)
        return self.output.delta(seq, text, (token,), (lp,) if lp is not None else None)

    def _fail(self, seq: Sequence, message: str) -> Delta:
        seq.error = message
        self._finish(seq, "error")
        return self.output.delta(seq, "", error=message)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        seqs = self._requests.get(seq.request_id)
        if seqs is not None and all(s.finished for s in seqs):
            del self._requests[seq.request_id]
            for s in seqs:
                self.output.remove(s)
            if self.metrics:
                self.metrics.on_request_done(seqs)
        elif seqs is None:
            self.output.remove(seq)

    def _report(self, num_tokens: int, generated: int, seconds: float = 0.0) -> None:
        if self.metrics:
            hits = self.bm.prefix_hits
            self.metrics.on_step(num_tokens, generated, seconds, hits - self._reported_hits)
            self._reported_hits = hits


def check_model_dir(model_dir: str | None) -> None:
    """FileNotFoundError naming what is wrong with ``--model`` before anything reads it."""
    if model_dir is None:
        return
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: the directory does not exist")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: not a directory (give the Hugging Face "
                                "model directory: config.json, safetensors, tokenizer files)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir}: the directory has no config.json (give "
                                "the Hugging Face model directory)")


@dataclasses.dataclass
class _InFlight:
    """A step enqueued on the device whose draws have not reached the host yet."""

    live: list[Scheduled]
    sampled: sampling.Sampled  # on the device
    want_lp: bool
    num_tokens: int
    t0: float  # when its dispatch began
    rows: dict[int, int]  # seq_id -> its row of ``sampled``
    prompt_lp: object = None  # the runner's PromptLogprobs (on the device), or None
    scored: list = dataclasses.field(default_factory=list)  # see LLMEngine._dispatch
    burst: int = 1  # decode steps in the call (num_scheduler_steps); >1: ``sampled`` [burst, S]
    last_tokens: jax.Array | None = None  # int32 [S]: its last step's draws (the next prev_tokens)
