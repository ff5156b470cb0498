"""Faults: a request that raises inside the engine, SIGTERM under load, impossible start-up
configurations. (KV pool exhaustion under load: test_soak.py and test_api_server.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

MAX_LEN = 256
PREP_FAULT_SEED, TOKEN_FAULT_SEED = 666, 667


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    runner = make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=128)
    engine = LLMEngine(runner, tokenizer)
    engine.warmup(progress=False)
    with LiveServer(engine) as s:
        yield s


def _inject_faults(engine, monkeypatch):
    """In-process fault injection: requests with a marker seed raise inside the engine, one
    while its step's inputs are built, one after its 3rd token was sampled."""
    sampling_row, append = engine._sampling_row, engine._append

    def faulty_row(seq):
        if seq.params.seed == PREP_FAULT_SEED:
            raise RuntimeError("injected fault: sampling set-up")
        return sampling_row(seq)

    def faulty_append(seq, token, lp):
        if seq.params.seed == TOKEN_FAULT_SEED and seq.num_output_tokens == 2:
            raise RuntimeError("injected fault: token bookkeeping")
        return append(seq, token, lp)

    monkeypatch.setattr(engine, "_sampling_row", faulty_row)
    monkeypatch.setattr(engine, "_append", faulty_append)


def test_a_request_that_raises_in_the_engine_fails_alone(server, monkeypatch):
    rng = np.random.default_rng(0)
    normal = [(rng.integers(6, 1000, int(rng.integers(1, 120))).tolist(), int(rng.integers(5, 40)))
              for _ in range(8)]
    body = lambda p, m, **kw: dict({"prompt": p, "max_tokens": m, "temperature": 0,
                                    "ignore_eos": True, "return_token_ids": True}, **kw)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        alone = [c.post("/v1/completions", json=body(p, m)).json()["choices"][0]["token_ids"]
                 for p, m in normal]
    _inject_faults(server.engine, monkeypatch)

    async def normal_one(c, i, p, m):
        if i % 2:
            r = await c.post("/v1/completions", json=body(p, m))
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        async with c.stream("POST", "/v1/completions", json=body(p, m, stream=True)) as r:
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return sum((json.loads(e)["choices"][0]["token_ids"] for e in events[:-1]), [])

    async def faulty(c, seed, stream):
        b = body([5, 6, 7, 8], 30, temperature=1.0, seed=seed, stream=stream)
        if not stream:
            r = await c.post("/v1/completions", json=b)
            return r.status_code, r.json()
        async with c.stream("POST", "/v1/completions", json=b) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines()
                      if line.startswith("data: {")]
        return r.status_code, events[-1]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(
                asyncio.gather(*(normal_one(c, i, p, m) for i, (p, m) in enumerate(normal))),
                asyncio.gather(*(faulty(c, seed, stream) for seed in (PREP_FAULT_SEED,
                                                                      TOKEN_FAULT_SEED)
                                 for stream in (False, True))))

    together, faults = asyncio.run(run())
    assert together == alone  # the others ran on, unchanged
    for (status, body_), (seed, stream) in zip(faults, [(s, st) for s in (PREP_FAULT_SEED,
                                                                          TOKEN_FAULT_SEED)
                                                        for st in (False, True)]):
        assert status == (200 if stream else 500), body_  # a stream's status line was sent
        err = body_["error"]
        assert err["type"] == "internal_server_error"
        assert "generation failed" in err["message"] and "injected fault" in err["message"]
    monkeypatch.undo()
    engine = server.engine
    deadline = time.monotonic() + 10
    while engine.bm.num_used_pages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.bm.num_used_pages == 0 and not engine._requests and not len(engine.output)
    engine.bm.check()
    with httpx.Client(base_url=server.url, timeout=60) as c:  # and it still serves
        p, m = normal[0]
        assert c.post("/v1/completions", json=body(p, m)).json()["choices"][0]["token_ids"] == alone[0]


# SIGTERM and start-up: the real command line in a subprocess ------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args, port=None):
    cmd = [sys.executable, "-m", "jaxattn.serve", "--log-level", "warning",
           "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
           "--buckets", "16,64", *args]
    if port is not None:
        cmd += ["--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_under_load_drains_and_exits_0():
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(port=port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

        async def one(c, i, started):
            body = {"prompt": [7 + i, 8, 9], "max_tokens": 60, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            try:
                if i % 2:
                    r = await c.post("/v1/completions", json=body)
                    if r.status_code == 200:
                        return "complete" if len(r.json()["choices"][0]["token_ids"]) == 60 \
                            else f"short {r.text[:200]}"
                    return "error" if "error" in r.json() else f"unshaped {r.text[:200]}"
                async with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                    tokens, last = 0, None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            last = json.loads(line[6:])
                            tokens += len(last["choices"][0]["token_ids"]) if last.get(
                                "choices") else 0
                            started.set()
                        elif line == "data: [DONE]":
                            return "complete" if tokens == 60 else (
                                "error" if "error" in last else f"short {tokens}")
                    return "cut"  # no [DONE]: neither finished nor answered with an error
            except httpx.HTTPError as e:
                return f"transport {type(e).__name__}"

        async def load():
            started = asyncio.Event()
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.create_task(one(c, i, started)) for i in range(12)]
                await asyncio.wait_for(started.wait(), 30)
                proc.send_signal(signal.SIGTERM)  # with every request in flight
                return await asyncio.gather(*tasks)

        outcomes = asyncio.run(load())
        code = proc.wait(60)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(o in ("complete", "error") for o in outcomes), outcomes
    assert outcomes.count("complete") >= 1
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    with pytest.raises(httpx.ConnectError):  # and it is gone
        httpx.get(url + "/health", timeout=2)


def test_impossible_kv_budget_is_a_clear_startup_error():
    """A KV budget no host can hold is refused before anything is allocated: one line, exit 1."""
    proc = _serve("--kv-cache-memory", "64TiB")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "exceeds the available host memory" in line and "--kv-cache-memory" in line


def test_out_of_memory_during_startup_is_a_clear_error(monkeypatch, capsys):
    """An allocation the device refuses while the engine is built (XLA's RESOURCE_EXHAUSTED,
    injected here: a real one on the CPU needs more than the host has) becomes one line."""
    from jaxattn.serve import __main__ as server
    from jaxattn.serve import cli
    from jaxattn.serve.engine import LLMEngine

    def oom(*a, **kw):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "85899345920 bytes.")

    monkeypatch.setattr(LLMEngine, "from_config", oom)
    args = server.build_parser().parse_args(["--max-model-len", "256"])
    with pytest.raises(SystemExit) as e:
        cli.start_engine(args)
    msg = str(e.value.code)
    assert msg.startswith("error: the device ran out of memory at start-up")
    assert "lower --kv-cache-memory" in msg and "\n" not in msg
