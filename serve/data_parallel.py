"""Data parallelism: several engine replicas behind the surface of one engine.

Each replica is an ordinary :class:`~jaxattn.serve.engine.LLMEngine` on its own
slice of the mesh (``jaxattn.parallel.replica_meshes``: its own weights, KV
pool, block manager and scheduler); the replicas exchange nothing. A request
goes to the least loaded replica and stays there. ``step()`` runs one step of
every busy replica at once, one thread each: a step's device work and its
blocking read of the sampled tokens release the GIL, so the replicas' steps
overlap on their devices.

The offline API, the async engine and the metrics use this class exactly like
an ``LLMEngine``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence as Seq

from jaxattn.serve.engine import EngineStats, LLMEngine
from jaxattn.serve.outputs import Delta
from jaxattn.serve.sampling_params import SamplingParams


class DataParallelEngine:
    def __init__(self, replicas: Seq[LLMEngine], *, metrics=None):
        if not replicas:
            raise ValueError("a data-parallel engine needs at least one replica")
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.tokenizer, self.bounds, self.max_model_len = (first.tokenizer, first.bounds,
                                                           first.max_model_len)
        self.runner, self.model_dir, self.config = first.runner, first.model_dir, first.config
        self.generation_defaults = first.generation_defaults
        self.metrics = None
        self._where: dict[str, LLMEngine] = {}  # request id -> its replica
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="jaxattn-replica")
        if metrics is not None:
            self.attach_metrics(metrics)

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def attach_metrics(self, metrics) -> None:
        metrics.bind(self)  # gauges read the totals of stats()
        for r in self.replicas:
            r.metrics = metrics  # events (tokens, requests, steps) come from each replica
        self.metrics = metrics

    # Requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        self.replicas[0].validate(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    *, arrival_time: float | None = None) -> None:
        if request_id in self._where:
            raise ValueError(f"request id {request_id!r} is already running")
        replica = min(self.replicas, key=_load)
        replica.add_request(request_id, prompt_token_ids, params, arrival_time=arrival_time)
        self._where[request_id] = replica

    def abort(self, request_id: str) -> bool:
        replica = self._where.pop(request_id, None)
        return replica is not None and replica.abort(request_id)

    def has_unfinished(self) -> bool:
        return any(r.has_unfinished() for r in self.replicas)

    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self.replicas)

    def stats(self) -> EngineStats:
        return EngineStats.total([r.stats() for r in self.replicas])

    def check(self) -> None:
        """Every replica's block manager is consistent (tests)."""
        for r in self.replicas:
            r.bm.check()

    @property
    def compile_count(self) -> int:
        return sum(r.compile_count for r in self.replicas)

    @property
    def warmed_up(self) -> bool:
        return all(r.warmed_up for r in self.replicas)

    # The loop ------------------------------------------------------------------------
    def warmup(self, progress: bool = True) -> None:
        for f in [self._pool.submit(r.warmup, progress and i == 0)
                  for i, r in enumerate(self.replicas)]:
            f.result()

    def step(self) -> list[Delta]:
        busy = [r for r in self.replicas if r.has_unfinished()]
        if len(busy) == 1:
            deltas = busy[0].step()
        else:
            deltas = [d for f in [self._pool.submit(r.step) for r in busy] for d in f.result()]
        for d in deltas:  # forget finished requests (their replica already freed them)
            replica = self._where.get(d.request_id)
            if replica is not None and not replica.has_request(d.request_id):
                del self._where[d.request_id]
        return deltas


def _load(replica: LLMEngine) -> tuple[int, int]:
    """How busy a replica is: sequences it holds, then KV pages in use."""
    s = replica.stats()
    return s.num_running + s.num_waiting, s.num_used_pages
