"""Prometheus metrics of one engine (its own registry, so several servers can share a process)."""

from __future__ import annotations

import collections
import threading
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The *_created series double every counter's output and no dashboard here reads them.
prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_RATE_WINDOW_S = 5.0  # tokens per second: over this many recent seconds


class EngineMetrics:
    def __init__(self, model_name: str = ""):
        r = self.registry = CollectorRegistry()
        lab = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(name, doc, list(lab), registry=r).labels(**lab)

        def counter(name, doc):
            return Counter(name, doc, list(lab), registry=r).labels(**lab)

        def hist(name, doc):
            return Histogram(name, doc, list(lab), buckets=_LATENCY_BUCKETS, registry=r).labels(**lab)

        self.running = gauge("jaxattn_num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("jaxattn_num_requests_waiting", "Sequences waiting (or preempted)")
        self.pages_used = gauge("jaxattn_kv_pages_used", "KV cache pages held by sequences "
                                "(the global layers' pool)")
        self.pages_free = gauge("jaxattn_kv_pages_free", "KV cache pages free (cached prefixes too)")
        self.chunked_pages_used = gauge("jaxattn_kv_chunked_pages_used",
                                        "Chunked-local layers' pages held (live chunks)")
        self.kv_usage = gauge("jaxattn_kv_cache_usage_perc", "Fraction of KV pages in use")
        self.tokens_per_s = gauge("jaxattn_generation_tokens_per_second",
                                  f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s")
        self.compiles = gauge("jaxattn_compiles", "XLA compiles on the engine's threads "
                              "(constant after warm-up)")
        self.device_wait = gauge("jaxattn_engine_device_wait_seconds", "Seconds the engine "
                                 "waited for steps' results on the device, since start (flat "
                                 "while the host sets the pace)")
        self.steps = counter("jaxattn_engine_steps", "Engine steps run")
        self.prompt_tokens = counter("jaxattn_prompt_tokens", "Prompt tokens received")
        self.generation_tokens = counter("jaxattn_generation_tokens", "Tokens generated")
        self.batched_tokens = counter("jaxattn_step_tokens", "Tokens computed in engine steps")
        self.prefix_hits = counter("jaxattn_prefix_cache_hit_tokens",
                                   "Prompt tokens served from shared pages")
        self.preemptions = counter("jaxattn_num_preemptions", "Sequences preempted (recompute)")
        self.finished = Counter("jaxattn_request_success", "Finished sequences by reason",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = hist("jaxattn_time_to_first_token_seconds", "Time to first token")
        self.itl = hist("jaxattn_inter_token_latency_seconds", "Time between tokens of a sequence")
        self.e2e = hist("jaxattn_e2e_request_latency_seconds", "Arrival to last token")
        self._model = model_name
        self._recent: collections.deque = collections.deque()  # (time, generated tokens)
        self._lock = threading.Lock()  # _recent: appended by the engine, read by scrapes
        self._start = time.monotonic()
        # Computed when scraped, so the rate falls to 0 while the engine is idle.
        self.tokens_per_s.set_function(self._rate)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()
            total = sum(g for _, g in self._recent)
        return total / max(min(_RATE_WINDOW_S, now - self._start), 1e-3)

    # Called by the engine (its thread) ---------------------------------------------------
    def on_request(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_preempt(self, n: int) -> None:
        self.preemptions.inc(n)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_request_done(self, seqs) -> None:
        now = time.monotonic()
        for s in seqs:
            self.finished.labels(self._model, s.finish_reason or "unknown").inc()
        self.e2e.observe(now - min(s.arrival_time for s in seqs))

    def on_step(self, num_tokens: int, generated: int, seconds: float,
                prefix_hit_tokens: int = 0) -> None:
        now = time.monotonic()
        if num_tokens:
            self.steps.inc()
            self.batched_tokens.inc(num_tokens)
        if generated:
            self.generation_tokens.inc(generated)
            with self._lock:
                self._recent.append((now, generated))
        if prefix_hit_tokens:
            self.prefix_hits.inc(prefix_hit_tokens)

    def bind(self, engine) -> None:
        """Gauges of the engine's state read ``engine.stats()`` when scraped (so they are right
        while it idles; a snapshot reads ints and list lengths, safe from the server's thread)."""
        self.running.set_function(lambda: engine.stats().num_running)
        self.waiting.set_function(lambda: engine.stats().num_waiting)
        self.pages_used.set_function(lambda: engine.stats().num_used_pages)
        self.pages_free.set_function(lambda: engine.stats().num_free_pages)
        self.chunked_pages_used.set_function(lambda: engine.stats().num_used_chunked_pages)
        self.kv_usage.set_function(lambda: _usage(engine.stats()))
        self.compiles.set_function(lambda: engine.stats().compile_count)
        self.device_wait.set_function(lambda: engine.stats().device_wait_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _usage(stats) -> float:
    return stats.num_used_pages / stats.num_pages
