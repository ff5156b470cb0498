"""OpenAI-compatible HTTP API over an :class:`AsyncEngine` (FastAPI + uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream`` over server-sent events), ``GET /v1/models``, ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's shapes), ``GET /health``,
``GET /metrics`` (Prometheus). Every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a request the
engine cannot run (too long, bad parameters, malformed JSON), 401 for a missing or
wrong API key (``api_key``: every route but /health and /metrics needs
``Authorization: Bearer KEY``), 404 for an unknown model, 413 for a body over
``max_request_body_bytes``, 503 when the engine is down, 500 for a bug.

Every response carries an ``X-Request-Id`` header: the request's own (then also the
base of the response's ``id``: ``cmpl-<id>``), or a fresh one. Fields a request sends
that the API does not define are ignored, as OpenAI and vLLM do, and logged as a
warning (a misspelt ``temprature`` would otherwise pass unnoticed). Sampling fields a
request leaves out take the model's ``generation_config.json`` defaults
(:mod:`jaxattn.serve.generation_config`).

A client that disconnects — mid-stream or while waiting for a whole answer —
aborts its request, which frees its KV pages.

One big request must not hold up the others. Tokenising, chat templates and
rendering whole answers run on worker threads, not on the event loop (the
tokenizers library lets go of the GIL while it encodes, so this is real
parallelism), and big inputs have a pool of their own. What cannot fit is refused
before any of that: a body over the limit with a 413 before it is read, a text
prompt too long to fit ``max_model_len`` tokens with a 400 from its length alone
(:meth:`Tokenizer.min_num_tokens`). A request's host memory is bounded: the body
and its parsed form, at most ``MAX_PROMPTS`` prompts of at most ``max_model_len``
token ids each, and at most ``MAX_LOGPROB_ENTRIES`` logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxattn.serve import generation_config
from jaxattn.serve import tool_calls
from jaxattn.serve.async_engine import AsyncEngine, EngineDeadError
from jaxattn.serve.outputs import Delta, TokenLogprob
from jaxattn.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    ErrorResponse, TokenizeRequest)
from jaxattn.serve.sampling_params import SamplingParams

log = logging.getLogger("jaxattn.serve")

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 413: "invalid_request_error",
                503: "service_unavailable", 500: "internal_server_error"}
# Routes anyone may call when the server has an API key: probes and scrapers carry none.
OPEN_PATHS = frozenset({"/health", "/metrics"})
# A client's X-Request-Id: becomes part of ids, logs and headers, so it is kept short and plain.
_MAX_REQUEST_ID = 128
_DISCONNECT_POLL_S = 0.25

# Work on more than this many characters of input (or a quarter as many output tokens) goes to
# the pool for big inputs: a tokenizer does about 1 MB/s, so what stays in the small pool
# takes tens of milliseconds at most and a 20 MB prompt can never queue ahead of it.
_SMALL_WORK = 64 * 1024
# Logprob entries one request may ask for (n × max_tokens × (1 + logprobs), summed over its
# prompts). An entry takes ~250 bytes while the answer is built, so this caps it near 64 MiB.
MAX_LOGPROB_ENTRIES = 1 << 18
# Prompts in one completion request: each costs an engine request, a generator and its share
# of the answer, and a few MB of `[[7], [7], ...]` would otherwise ask for a million of them.
MAX_PROMPTS = 1024
_TRIM_AFTER = 1 << 20


def default_max_request_body_bytes(max_model_len: int) -> int:
    """8 MiB, or 16 bytes per token of context if that is more: room for a prompt of
    ``max_model_len`` tokens as text or as a JSON list of ids, with a margin."""
    return max(8 << 20, 16 * max_model_len)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: text taken from a request (a model name, a field name in a
    validation message) may hold lone surrogates, which UTF-8 cannot encode; they become '?'
    rather than a response that fails half-way."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "replace")


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    return SafeJSONResponse(status_code=status, content={"error": {
        "message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
        "param": param, "code": code}})


def build_app(engine: AsyncEngine, *, model_name: str, metrics=None, owns_engine: bool = True,
              max_request_body_bytes: int | None = None, api_key: str | None = None) -> FastAPI:
    """The app; with ``owns_engine`` its lifespan starts and stops the engine thread. A body
    over ``max_request_body_bytes`` (default: :func:`default_max_request_body_bytes`) is a
    413, counted as it arrives, so chunked uploads are cut off too. ``api_key``: every
    route but :data:`OPEN_PATHS` needs ``Authorization: Bearer <api_key>`` (else a 401)."""
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    body_limit = max_request_body_bytes or default_max_request_body_bytes(max_model_len)
    gen_defaults = dict(getattr(engine.engine, "generation_defaults", {}))
    workers = _Workers()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if owns_engine:
            engine.start()
        try:
            yield
        finally:
            workers.shutdown()
            if owns_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="jaxattn", version="0.1.0", lifespan=lifespan,
                  default_response_class=SafeJSONResponse)
    app.router.route_class = _FastJSONRoute
    app.add_middleware(_BodyLimit, limit=body_limit)
    if api_key:  # before the body is read: a caller without the key learns nothing else
        app.add_middleware(_APIKey, key=api_key)
    app.add_middleware(_TrimAfterBigRequests)
    app.add_middleware(_RequestId)  # outermost: every answer (401, 413 too) carries the id
    _document_errors(app)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()))}: {er.get('msg')}"
                        for er in errs[:5]) or "invalid request"
        return error_response(400, msg, param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 413:
            return _body_too_large(body_limit)
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request, e: EngineDeadError):
        return error_response(503, str(e))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}")

    def check_model(name: str | None):
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    @app.get("/health", responses=_errors(503))
    async def health():
        if not engine.alive:
            return error_response(503, f"the engine stopped: {engine.error!r}")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "jaxattn",
            "root": model_name, "max_model_len": max_model_len}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        if metrics is None:
            return Response("", media_type="text/plain")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def fits(num_prompt_tokens: int, params: SamplingParams, *, exact: bool = True) -> None:
        """The engine's own 400 for a request over ``max_model_len``, raised before the engine
        sees it (and, with ``exact=False``, from a lower bound, before any tokenising)."""
        completion = params.max_tokens or 1
        want = num_prompt_tokens + completion
        if want > max_model_len:
            least = "" if exact else "at least "
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. "
                           f"However, you requested {least}{want} tokens ({least}"
                           f"{num_prompt_tokens} in the prompt, {completion} in the completion). "
                           "Please reduce the length of the prompt or max_tokens.")

    def encode_all(texts: list[str]) -> list[list[int]]:
        return [_encode(tokenizer, t) for t in texts]

    def encode_chat(messages: list[dict], add_generation_prompt: bool,
                    params: SamplingParams, tools: list[dict] | None = None) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **({"tools": tools} if tools else {}))
            # The template may trim or drop text: the bound holds for what it rendered.
            fits(tokenizer.min_num_tokens(text), params, exact=False)
            # The template writes the BOS token itself: encoding must not add another.
            return tokenizer.encode(text, add_special_tokens=False)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    def sampling(req) -> SamplingParams:
        """The request's SamplingParams, with the model's defaults for what it left out."""
        given = {k for k in req.model_fields_set if getattr(req, k) is not None}
        return generation_config.apply(_params(req), gen_defaults, given)

    @app.get("/tokenizer_info", responses=_errors(401))
    async def tokenizer_info():
        """vLLM's tokenizer description: what lm-eval's remote tokenizer reads."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": None,
                "chat_template": tokenizer.chat_template, "model_max_length": max_model_len,
                "vocab_size": tokenizer.vocab_size}

    def tokenize(req: TokenizeRequest) -> dict:
        try:
            req.check()
            if req.messages is not None:
                text = tokenizer.apply_chat_template(
                    [m.as_template_input() for m in req.messages],
                    add_generation_prompt=req.add_generation_prompt)
                special = bool(req.add_special_tokens)  # the template writes BOS itself
            else:
                text, special = req.prompt, req.add_special_tokens is not False
            ids = tokenizer.encode(text, add_special_tokens=special)
        except ValueError as e:
            raise APIError(400, str(e), "messages" if req.messages is not None else "prompt"
                           ) from None
        out = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return out

    @app.post("/tokenize", responses=_errors(400, 401, 404, 413))
    async def tokenize_route(req: TokenizeRequest, request: Request):
        check_model(req.model)
        await _warn_unknown_fields(req, request)
        return await workers.run(len(await request.body()), tokenize, req)

    def detokenize(ids: list[int]) -> dict:
        vocab = tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}

    @app.post("/detokenize", responses=_errors(400, 401, 404, 413))
    async def detokenize_route(req: DetokenizeRequest, request: Request):
        check_model(req.model)
        await _warn_unknown_fields(req, request)
        return await workers.run(4 * len(req.tokens), detokenize, req.tokens)

    @app.post("/v1/completions", responses=_STREAM | _errors(400, 401, 404, 413, 500, 503))
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        await _warn_unknown_fields(req, request)
        # `echo` with `max_tokens: 0` scores the prompt and generates nothing (what evaluation
        # harnesses send for log-likelihoods): the engine draws one token, which is dropped.
        echo_only = req.echo and req.max_tokens == 0
        if echo_only:
            req = req.model_copy(update={"max_tokens": 1})
        params = sampling(req)
        if req.echo and req.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        try:
            given = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        if len(given) > MAX_PROMPTS:
            raise APIError(400, f"A request may carry at most {MAX_PROMPTS} prompts; this one has "
                           f"{len(given)}.", "prompt")
        for p in given:  # what cannot fit is refused before anything is tokenised
            if isinstance(p, str):
                fits(tokenizer.min_num_tokens(p), params, exact=False)
            else:
                fits(len(p), params)
        texts = [p for p in given if isinstance(p, str)]
        encoded = iter(await workers.run(len(await request.body()), encode_all, texts)
                       if texts else ())
        prompts = [(p, next(encoded)) if isinstance(p, str) else (None, p) for p in given]
        _check_logprobs([len(ids) for _, ids in prompts], params, max_model_len)
        rid, eid = _ids("cmpl", request)
        # Every prompt is validated before anything streams (a 400 must come before a 200).
        gens = await _start_all(engine, [(f"{eid}-{i}", ids) for i, (_, ids) in enumerate(prompts)],
                                params)
        if req.stream:
            return _sse(_completion_chunks(rid, model_name, gens, params.n, req, tokenizer,
                                           prompts, echo_only), gens)
        results = await _collect_all(gens, request)
        work = _output_work(results, params) + (
            sum(len(ids) for text, ids in prompts) * 4 * (1 + (params.prompt_logprobs or 0))
            if req.echo else 0)
        return await workers.run(work, _completion_response, rid, model_name, prompts, results,
                                 req, params, tokenizer, echo_only)

    @app.post("/v1/chat/completions", responses=_STREAM | _errors(400, 401, 404, 413, 500, 503))
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        await _warn_unknown_fields(req, request)
        params = sampling(req)
        try:
            messages = [m.as_template_input() for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        _, tool_choice = req.tool_setup()  # validated by _params
        ids = await workers.run(len(await request.body()), encode_chat, messages,
                                req.add_generation_prompt, params, req.tools)
        _check_logprobs([len(ids)], params, max_model_len)
        rid, eid = _ids("chatcmpl", request)
        (gen,) = await _start_all(engine, [(eid, ids)], params)
        if req.stream:
            return _sse(_chat_chunks(rid, model_name, gen, params.n, req, tokenizer, tool_choice),
                        [gen])
        (deltas,) = await _collect_all([gen], request)
        return await workers.run(_output_work([deltas], params), _chat_response, rid,
                                 model_name, deltas, params, tokenizer, tool_choice)

    return app


def _ids(prefix: str, request: Request) -> tuple[str, str]:
    """(the response's id, the engine's request id). A client's X-Request-Id names the
    response (``cmpl-<id>``, as vLLM does), but two requests may send the same one: the engine
    id then gets a suffix of its own."""
    rid, given = request.scope.get("jaxattn.request_id") or (uuid.uuid4().hex, False)
    name = f"{prefix}-{rid}"
    return name, (f"{name}-{uuid.uuid4().hex[:12]}" if given else name)


async def _warn_unknown_fields(req, request: Request) -> None:
    """Unknown fields are ignored (OpenAI's and vLLM's behaviour); a warning names them."""
    try:
        body = await request.json()
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    unknown = [k for k in body if k not in type(req).model_fields]
    if unknown:
        names = ", ".join(repr(k[:64]) for k in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        log.warning("%s: ignoring unknown request fields %s", request.url.path, names)


class _RequestId:
    """``X-Request-Id`` on every response: the client's (printable ASCII, at most
    ``_MAX_REQUEST_ID`` characters; anything else is a 400) or a fresh one. The handlers find
    it in the scope as ``(id, given by the client)``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id")
        if given is not None and not (0 < len(given) <= _MAX_REQUEST_ID
                                      and all("!" <= c <= "~" for c in given)):
            return await error_response(
                400, f"X-Request-Id must be 1 to {_MAX_REQUEST_ID} printable ASCII characters "
                "without spaces", "X-Request-Id")(scope, receive, send)
        rid = given or uuid.uuid4().hex
        scope["jaxattn.request_id"] = (rid, given is not None)
        header = (b"x-request-id", rid.encode("ascii"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), header])
            await send(message)

        await self.app(scope, receive, send_with_id)


class _APIKey:
    """A 401 in OpenAI's shape for a request to any route but :data:`OPEN_PATHS` without
    ``Authorization: Bearer <key>``; compared in constant time (``hmac.compare_digest``)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        # Starlette decodes header bytes as latin-1: encoding back gives the bytes sent.
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        response = error_response(401, "Incorrect or missing API key: send the header "
                                  "`Authorization: Bearer <key>` with the server's --api-key.",
                                  code="invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)


def _body_too_large(limit: int) -> JSONResponse:
    response = error_response(413, f"The request body is larger than this server's limit of "
                              f"{limit} bytes (--max-request-body-bytes).",
                              code="request_too_large")
    # The rest of the body is not wanted: closing beats reading it only to throw it away.
    response.headers["connection"] = "close"
    return response


class _BodyLimit:
    """A 413 for a body over ``limit`` bytes, in OpenAI's error shape: at once when its
    Content-Length says so (nothing is read), else as soon as the bytes read pass the limit
    (a chunked upload has no Content-Length). Starlette's own limit answers in plain text."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _body_too_large(self.limit)(scope, receive, send)
        seen = 0

        async def receive_counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI hands this on to the app's handler
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, receive_counted, send)


class _FastJSONRequest(Request):
    """A body parsed by pydantic-core's JSON parser: 20 MB in a few ms where ``json.loads``
    took ~50 (neither lets go of the GIL, so that was 50 ms of event loop). Whatever it
    refuses goes to ``json.loads``, whose errors (and leniencies: lone surrogates, other
    encodings) FastAPI's messages are built on."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:
                self._json = json.loads(body)
        return self._json


class _FastJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            return await handler(_FastJSONRequest(request.scope, request.receive))

        return route_handler


class _Workers:
    """Threads for the CPU-heavy part of requests, sized for the machine: one pool for
    everyday inputs and one for big ones, so a huge input waits behind huge inputs only."""

    def __init__(self):
        cpus = len(os.sched_getaffinity(0))
        self.small = ThreadPoolExecutor(max(2, min(8, cpus // 2)),
                                        thread_name_prefix="jaxattn-tokenize")
        self.large = ThreadPoolExecutor(max(1, min(8, cpus // 4)),
                                        thread_name_prefix="jaxattn-tokenize-large")

    async def run(self, work: int, fn, *args):
        """``fn(*args)`` on a worker; ``work``: characters of input (4 per token of output)."""
        pool = self.large if work > _SMALL_WORK else self.small
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        for pool in (self.small, self.large):
            pool.shutdown(wait=False, cancel_futures=True)


class _TrimAfterBigRequests:
    """Hands freed memory back to the OS after a request that moved over ``_TRIM_AFTER``
    bytes (body in plus answer out). glibc keeps what is freed in its arenas, and after a big
    block is freed it raises its mmap threshold, so the next tens of MB come from (and stay in)
    an arena too: without this, resident memory climbed ~50 MB in a few oversized requests
    and stayed there."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _LIBC is None:
            return await self.app(scope, receive, send)
        moved = 0

        async def receive_counted():
            nonlocal moved
            message = await receive()
            moved += len(message.get("body", b""))
            return message

        async def send_counted(message):
            nonlocal moved
            moved += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_counted, send_counted)
        finally:
            if moved > _TRIM_AFTER:  # a thread: ctypes lets go of the GIL, trimming takes ms
                asyncio.get_running_loop().run_in_executor(None, _LIBC.malloc_trim, 0)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()  # glibc's malloc_trim, None elsewhere


# The OpenAPI schema says what the server really answers, so schema-driven clients and
# fuzzers (schemathesis) can hold it to that: every error is OpenAI's shape, streams are SSE,
# and FastAPI's default 422 never happens (validation errors are 400s).
_STREAM = {200: {"description": "JSON, or server-sent events when `stream` is true: `data:` "
                                "lines of JSON chunks, then `data: [DONE]`",
                 "content": {"text/event-stream": {"schema": {
                     "type": "object", "properties": {"data": {"type": "string"}},
                     "required": ["data"]}}}}}
_ERROR_DOCS = {400: "Invalid request (bad parameters, malformed JSON, prompt too long)",
               401: "Missing or wrong API key (the server runs with --api-key)",
               404: "Unknown model", 413: "Request body over --max-request-body-bytes",
               500: "Generation failed inside the engine",
               503: "The engine is not running"}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERROR_DOCS[s]} for s in statuses}


def _document_errors(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# Requests -> engine --------------------------------------------------------------------------
def _params(req) -> SamplingParams:
    try:
        return req.sampling_params()
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_logprobs(prompt_lens: list[int], params: SamplingParams, max_model_len: int) -> None:
    entries = 0
    if params.logprobs is not None:
        entries += sum(params.n * (params.max_tokens or max_model_len - n) * (1 + params.logprobs)
                       for n in prompt_lens)
    if params.prompt_logprobs is not None:  # echoed once per choice
        entries += sum(params.n * n * (1 + params.prompt_logprobs) for n in prompt_lens)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(400, f"This request asks for up to {entries} logprobs (n × max_tokens × "
                       f"(1 + logprobs), plus n × prompt tokens × (1 + logprobs) with echo, "
                       f"summed over its prompts); the limit is "
                       f"{MAX_LOGPROB_ENTRIES}. Please reduce n, max_tokens or logprobs.",
                       "logprobs")


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except Exception as e:  # e.g. text the tokenizer rejects
        raise APIError(400, f"cannot tokenize the prompt: {e}", "prompt") from None


class _Generation:
    """One engine request seen from a handler: its deltas, with the first one fetched early so
    that a request the engine refuses becomes an HTTP 400 before any response starts, and a
    synchronous ``close`` that aborts it if unfinished (safe in any ``finally``, even under
    cancellation, since it never awaits)."""

    def __init__(self, engine: AsyncEngine, rid: str, ids, params: SamplingParams):
        self.engine, self.rid = engine, rid
        self.it = engine.generate(rid, ids, params)
        self.head: list[Delta] = []
        self.open = params.n  # outputs not finished yet
        self.exhausted = False

    def _seen(self, d: Delta) -> Delta:
        if d.finish_reason is not None:
            self.open -= 1
        return d

    async def first(self) -> None:
        try:
            self.head = [self._seen(await self.it.__anext__())]
        except StopAsyncIteration:
            self.exhausted = True
        except ValueError as e:
            self.open = 0
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:
            self.open = 0
            raise APIError(503, str(e)) from None

    async def __aiter__(self):
        for d in self.head:
            yield d
        if not self.exhausted:
            async for d in self.it:
                yield self._seen(d)

    def close(self) -> None:
        if self.open > 0:
            self.open = 0
            self.engine.abort(self.rid)


async def _start_all(engine: AsyncEngine, items: list[tuple[str, list[int]]],
                     params: SamplingParams) -> list[_Generation]:
    gens = [_Generation(engine, rid, ids, params) for rid, ids in items]
    try:
        for g in gens:
            await g.first()
    except BaseException:
        for g in gens:
            g.close()
        raise
    return gens


async def _collect_all(gens: list[_Generation], request: Request) -> list[list[Delta]]:
    """All deltas of each generation; aborts them all if the client goes away first."""

    async def collect(g):
        return [d async for d in g]

    task = asyncio.ensure_future(asyncio.gather(*(collect(g) for g in gens)))
    task.add_done_callback(_retrieve)  # cancelled on disconnect: nobody awaits it then
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise APIError(400, "the client disconnected")
        results = task.result()
    finally:
        if not task.done():
            task.cancel()
        for g in gens:
            g.close()
    for deltas in results:
        for d in deltas:
            if d.error is not None:
                raise APIError(500, f"generation failed: {d.error}")
    return results


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _output_work(results: list[list[Delta]], params: SamplingParams) -> int:
    tokens = sum(len(d.token_ids) for deltas in results for d in deltas)
    return 4 * tokens * (1 + (params.logprobs or 0))


# The answers are rendered to JSON on the worker too: a dict handed back to FastAPI would be
# walked by jsonable_encoder on the event loop, slowly for a big one.
def _completion_response(rid, model_name, prompts, results, req: CompletionRequest,
                         params: SamplingParams, tokenizer, echo_only: bool) -> SafeJSONResponse:
    n = params.n
    choices, usage = [], _usage()
    for i, ((text, ids), deltas) in enumerate(zip(prompts, results)):
        per = _merge(deltas, n, echo_only)
        prompt_lps = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None),
                          None)
        for j in range(n):
            out = per[j]
            prefix = (text if text is not None else tokenizer.decode(ids)) if req.echo else ""
            lp = None
            if params.logprobs is not None:
                lp = _completion_logprobs(
                    out["logprobs"], tokenizer,
                    prompt=(ids, prompt_lps) if req.echo and prompt_lps is not None else None)
            choices.append({"index": i * n + j, "text": prefix + out["text"], "logprobs": lp,
                            "finish_reason": out["finish_reason"]})
            if req.return_token_ids:
                choices[-1]["token_ids"] = out["token_ids"]
        _add_usage(usage, deltas, n)
    if echo_only:  # the one token drawn was dropped
        usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
    return SafeJSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": model_name, "choices": choices, "usage": usage})


def _chat_response(rid, model_name, deltas: list[Delta], params: SamplingParams,
                   tokenizer, tool_choice: str | None = None) -> SafeJSONResponse:
    per = _merge(deltas, params.n)
    choices = []
    for j in range(params.n):
        message = {"role": "assistant", "content": per[j]["text"]}
        finish = per[j]["finish_reason"]
        calls = (tool_calls.parse(per[j]["text"]) if tool_choice not in (None, "none")
                 else None)
        if calls:
            message = {"role": "assistant", "content": None,
                       "tool_calls": [c.as_openai() for c in calls]}
            finish = _tool_finish(finish, tool_choice)
        choices.append({"index": j, "message": message,
                        "logprobs": _chat_logprobs(per[j]["logprobs"], tokenizer)
                        if params.logprobs is not None else None,
                        "finish_reason": finish})
    usage = _usage()
    _add_usage(usage, deltas, params.n)
    return SafeJSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": model_name, "choices": choices, "usage": usage})


def _merge(deltas: list[Delta], n: int, echo_only: bool = False) -> list[dict]:
    """Each output's whole text, ids, logprobs and finish reason; ``echo_only``: none of the
    output (the prompt alone was asked for), finish reason "length"."""
    out = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for _ in range(n)]
    for d in deltas:
        o = out[d.index]
        if d.finish_reason is not None:
            o["finish_reason"] = "length" if echo_only else d.finish_reason
        if echo_only:
            continue
        o["text"] += d.text
        o["token_ids"].extend(d.token_ids)
        o["logprobs"].extend(d.logprobs or ())
    return out


def _usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _add_usage(usage: dict, deltas: list[Delta], n: int) -> None:
    if not deltas:
        return
    completion = {}
    for d in deltas:
        completion[d.index] = d.num_output_tokens
    prompt = deltas[0].num_prompt_tokens
    usage["prompt_tokens"] += prompt
    usage["completion_tokens"] += sum(completion.values())
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    cached = max(d.num_cached_tokens for d in deltas)
    if cached:
        usage.setdefault("prompt_tokens_details", {"cached_tokens": 0})
        usage["prompt_tokens_details"]["cached_tokens"] += cached


# Logprobs in OpenAI's two shapes ----------------------------------------------------------------
def _tok(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(lps: list[TokenLogprob], tokenizer, offset: int = 0,
                         prompt: tuple | None = None) -> dict:
    """OpenAI's legacy shape; ``prompt``: (prompt ids, their logprobs) to put first (echo):
    the first prompt token has no logprob (null), as OpenAI and vLLM report it."""
    tokens, token_lps, tops, offsets = [], [], [], []
    if prompt is not None:
        ids, plps = prompt
        for token_id, t in zip(ids, plps):
            s = _tok(tokenizer, token_id)
            offsets.append(offset)
            offset += len(s)
            tokens.append(s)
            token_lps.append(None if t is None else t.logprob)
            tops.append({_tok(tokenizer, i): lp for i, lp in t.top} if t is not None and t.top
                        else None)
    for t in lps:
        s = _tok(tokenizer, t.token_id)
        offsets.append(offset)
        offset += len(s)
        tokens.append(s)
        token_lps.append(t.logprob)
        tops.append({_tok(tokenizer, i): lp for i, lp in t.top} if t.top else None)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob], tokenizer) -> dict:
    def entry(token_id, lp):
        # The token's own bytes: one that ends inside a UTF-8 character decodes to U+FFFD,
        # whose bytes are not the token's; a client joins these to rebuild the text.
        return {"token": _tok(tokenizer, token_id), "logprob": lp,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [dict(entry(t.token_id, t.logprob),
                             top_logprobs=[entry(i, lp) for i, lp in t.top]) for t in lps]}


# Streaming ------------------------------------------------------------------------------------
def _sse(chunks: AsyncIterator[dict], gens: list[_Generation]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield _sse_event(chunk)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            log.exception("stream failed")
            yield _sse_event(_error_chunk(f"{type(e).__name__}: {e}"))
        else:
            yield "data: [DONE]\n\n"
        finally:  # also on disconnect (the response task is cancelled): abort what is left
            for g in gens:
                g.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# JSON leaves U+0085, U+2028 and U+2029 unescaped, but line splitters that follow
# str.splitlines (httpx's iter_lines among them) end a line there: a token that decodes to one
# would cut its event in two. Escaped, every event is one line for every client.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse_event(obj: dict) -> str:
    text = json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


async def _merged(gens: list[_Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several generations as they come: (generation index, delta)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for d in g:
                await q.put((i, d))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    live = len(gens)
    try:
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _error_chunk(message: str) -> dict:
    return {"error": {"message": message, "type": "internal_server_error", "param": None,
                      "code": None}}


async def _completion_chunks(rid, model, gens, n, req: CompletionRequest, tokenizer, prompts,
                             echo_only: bool):
    created = int(time.time())
    # Usage needs only each output's latest delta: holding every delta (logprobs and all) for
    # the length of a stream would grow with it.
    latest: list[dict[int, Delta]] = [{} for _ in gens]
    offsets: dict[int, int] = {}
    started: set[int] = set()  # choices whose echo (the prompt) went out
    # Echo with logprobs: the prompt's logprobs come with output 0's first delta; the other
    # outputs of that prompt wait for them (they open with the prompt too).
    want_prompt_lps = req.echo and req.logprobs is not None
    prompt_lps: dict[int, tuple] = {}
    held: dict[int, list[Delta]] = {}

    def chunk(i: int, d: Delta) -> dict | None:
        index = i * n + d.index
        text, lp_parts = d.text if not echo_only else "", []
        token_ids = list(d.token_ids) if not echo_only else []
        prompt = None
        if req.echo and index not in started:
            started.add(index)
            ptext, ids = prompts[i]
            text = (ptext if ptext is not None else tokenizer.decode(ids)) + text
            if want_prompt_lps:
                prompt = (ids, prompt_lps[i])
        finish = ("length" if echo_only else d.finish_reason) if d.finish_reason else None
        new_lps = list(d.logprobs or ()) if not echo_only else []
        if not (text or finish or new_lps or prompt or (req.return_token_ids and token_ids)):
            return None
        lp = None
        if req.logprobs is not None and (new_lps or prompt):
            lp = _completion_logprobs(new_lps, tokenizer, offsets.get(index, 0), prompt)
            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice]}

    async for i, d in _merged(gens):
        latest[i][d.index] = d
        if d.error is not None:
            yield _error_chunk(f"generation failed: {d.error}")
            return
        ready = [d]
        if want_prompt_lps and i not in prompt_lps:
            if d.prompt_logprobs is None:
                held.setdefault(i, []).append(d)
                continue
            prompt_lps[i] = d.prompt_logprobs
            ready += held.pop(i, [])
        for r in ready:
            c = chunk(i, r)
            if c is not None:
                yield c
    if req.stream_options and req.stream_options.include_usage:
        usage = _usage()
        for deltas in latest:
            _add_usage(usage, list(deltas.values()), n)
        if echo_only:
            usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
        yield {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": usage}


def _tool_finish(finish: str | None, tool_choice: str | None) -> str | None:
    """OpenAI's finish_reason for an output that made calls: "tool_calls", except for a
    named tool_choice ("stop"), and "length" stays."""
    if finish != "stop" or tool_choice not in ("auto", "required"):
        return finish
    return "tool_calls"


async def _chat_chunks(rid, model, gen, n, req: ChatCompletionRequest, tokenizer,
                       tool_choice: str | None = None):
    created = int(time.time())
    # Per output: its tool-call stream (None: plain content).
    tools = {j: tool_calls.ToolCallStream(constrained=tool_choice not in ("auto",))
             for j in range(n)} if tool_choice not in (None, "none") else {}
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    for j in range(n):
        yield dict(base, choices=[{"index": j, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])
    latest: dict[int, Delta] = {}  # all that usage needs (see _completion_chunks)
    async for _, d in _merged([gen]):
        latest[d.index] = d
        if d.error is not None:
            yield _error_chunk(f"generation failed: {d.error}")
            return
        if not d.text and d.finish_reason is None and not d.logprobs:
            continue
        lp = (_chat_logprobs(list(d.logprobs), tokenizer)
              if req.logprobs and d.logprobs else None)
        finish = d.finish_reason
        if d.index in tools:
            stream = tools[d.index]
            deltas = stream.feed(d.text, final=d.finish_reason is not None)
            if stream.calls:
                finish = _tool_finish(finish, tool_choice)
            for k, delta in enumerate(deltas):  # the finish and logprobs go with the last
                last = k == len(deltas) - 1
                yield dict(base, choices=[{"index": d.index, "delta": delta,
                                           "logprobs": lp if last else None,
                                           "finish_reason": finish if last else None}])
            if deltas or (finish is None and not lp):
                continue
            delta = {}
        else:
            delta = {"content": d.text} if d.text else {}
        yield dict(base, choices=[{"index": d.index, "delta": delta, "logprobs": lp,
                                   "finish_reason": finish}])
    if req.stream_options and req.stream_options.include_usage:
        usage = _usage()
        _add_usage(usage, list(latest.values()), n)
        yield dict(base, choices=[], usage=usage)
