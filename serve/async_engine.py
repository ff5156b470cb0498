"""The engine on its own thread, with an asyncio face for the HTTP server.

Only the engine thread touches the engine's state: requests and aborts
arrive through a thread-safe inbox that the thread drains before every step,
and each step's deltas go back to the waiting coroutines with
``loop.call_soon_threadsafe``. A coroutine that stops listening (client gone,
task cancelled) aborts its request in a ``finally``, so its pages are freed
whichever way it ends.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
from typing import AsyncIterator, Sequence

from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.outputs import Delta
from jaxattn.serve.sampling_params import SamplingParams

log = logging.getLogger("jaxattn.serve")


class EngineDeadError(RuntimeError):
    pass


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.queue = loop, asyncio.Queue()
        self.open = n  # outputs the engine thread has not finished yet (engine thread only)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


# What the event loop sends the engine thread --------------------------------------------
@dataclasses.dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: _Stream  # where the request's deltas go


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Wake:
    """Nothing to do but look at the stop flag."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxattn-engine", daemon=True)
        self.error: BaseException | None = None

    # Lifecycle (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # Requests (event loop) ------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[Delta]:
        """Deltas of one request until all its outputs finish. ValueError if it cannot run."""
        if not self.alive:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        self.engine.validate(prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), params.n)
        self._inbox.put(AddRequest(request_id, list(prompt_token_ids), params, stream))
        unfinished = params.n
        try:
            while unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    unfinished = 0  # the engine has already dropped it
                    raise item
                for d in item:
                    if d.finish_reason is not None:
                        unfinished -= 1
                    yield d
        finally:
            if unfinished:  # the listener left early (disconnect, cancel): free its pages
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    # Engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
        except BaseException as e:  # a bug in the loop itself: fail everyone, loudly
            log.exception("engine loop died")
            self.error = e
        finally:
            err = self.error or EngineDeadError("the engine is shutting down")
            for rid, stream in list(self._streams.items()):
                self.engine.abort(rid)
                stream.put(err)
            self._streams.clear()
            while True:  # requests still in the inbox would otherwise wait forever
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(msg, AddRequest):
                    msg.stream.put(err)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(msg)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, msg: AddRequest | AbortRequest | Wake) -> None:
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
            except ValueError as e:
                msg.stream.put(e)
                return
            self._streams[msg.request_id] = msg.stream
        elif isinstance(msg, AbortRequest):
            self._streams.pop(msg.request_id, None)
            self.engine.abort(msg.request_id)

    def _deliver(self, deltas: list[Delta]) -> None:
        by_request: dict[str, list[Delta]] = collections.defaultdict(list)
        for d in deltas:
            by_request[d.request_id].append(d)
        for rid, ds in by_request.items():
            stream = self._streams.get(rid)
            if stream is None:
                continue
            stream.put(ds)
            stream.open -= sum(d.finish_reason is not None for d in ds)
            if stream.open <= 0:
                del self._streams[rid]
