"""One oversized request must not stall everyone else (issue 25).

The real command line (``python -m jaxattn.serve``) runs in a subprocess, so the event loop
under test has a GIL of its own and the resident memory measured is the server's alone. Big
bodies go out through bare sockets, prebuilt and sent with one ``sendall`` (which lets go of
the GIL), so the test's own work stays off the latencies it measures.
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil
import pytest

MAX_LEN = 256
LATENCY_S = 0.2  # a probe's median beside the oversized requests
STALL_S = 1.0  # any one probe (tokenising 20 MB on the event loop stalled them for 46 s)
ROUNDS = 10  # a 20 MB prompt and a 50 MB body in each: 20 oversized requests
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """(url, port, process). Its body limit lets a 20 MB prompt be read (and refused by its
    length) while a 50 MB body is refused unread."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxattn.serve", "--log-level", "warning", "--port", str(port),
             "--max-model-len", str(MAX_LEN), "--max-num-seqs", "8",
             "--max-num-batched-tokens", "64", "--buckets", "16,64",
             "--max-request-body-bytes", "32MiB"],
            stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, "the server exited"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
            yield url, port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
            log.seek(0)
            stderr = log.read()
        assert "Traceback" not in stderr, stderr[-3000:]


# Bodies, built once and only by the tests that use them -----------------------------------
@functools.cache
def prompt_20mb() -> bytes:
    return json.dumps({"prompt": "hello world, the quick brown fox. " * (20_000_000 // 34),
                       "max_tokens": 5}).encode()


@functools.cache
def body_50mb() -> bytes:
    return b'{"prompt": "' + b"x" * 50_000_000 + b'"}'


def chunked(body: bytes, size: int = 1 << 20) -> bytes:
    """``body`` in HTTP/1.1 chunked framing (no Content-Length: only counting can limit it)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def _post_raw(port: int, body: bytes, *, path: str = CMPL, is_chunked: bool = False):
    """POST prebuilt bytes; (status, JSON answer). A server that answers early and closes (a
    413) cuts the upload short: its answer is read all the same."""
    framing = b"Transfer-Encoding: chunked" if is_chunked else b"Content-Length: %d" % len(body)
    head = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s\r\n"
            b"Connection: close\r\n\r\n" % (path.encode(), framing))
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head)
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:  # after the answer: the unread rest of the upload
            pass
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" not in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def _latency_bound() -> float:
    """The probes' median latency: 0.2 s; 1 s on a machine oversubscribed well past its cores
    (other work on a shared machine), where every process waits its turn for a core and 0.2 s
    says more about the machine than about the server."""
    overloaded = os.getloadavg()[0] > 1.5 * len(os.sched_getaffinity(0))
    return STALL_S if overloaded else LATENCY_S


def _error(status: int, answer: dict, want: int, needle: str) -> dict:
    assert status == want, (status, str(answer)[:300])
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert needle.lower() in err["message"].lower(), err
    return err


def test_health_and_short_requests_answer_while_oversized_ones_are_in_flight(server):
    url, port, proc = server
    rss = lambda: psutil.Process(proc.pid).memory_info().rss  # noqa: E731
    short = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    bodies = {False: body_50mb(), True: chunked(body_50mb())}
    # Each probe within STALL_S, their median within LATENCY_S: on 2 cores beside the test
    # suite's other worker one probe in a round now and then took 0.25-0.35 s (the machine's
    # scheduling: the same code passed and failed a 0.2 s bound on every probe in turn).
    took_all = {"health": [], "completion": []}
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(5):  # warm
            assert c.post(CMPL, json=short).status_code == 200
        before = rss()
        for i in range(ROUNDS):
            outcomes = {}

            def send(name, body, is_chunked):
                t0 = time.monotonic()
                outcomes[name] = _post_raw(port, body, is_chunked=is_chunked), time.monotonic() - t0

            no_length = i % 2 == 1  # every other 50 MB body comes chunked
            senders = [threading.Thread(target=send, args=o) for o in
                       [("prompt", prompt_20mb(), False), ("body", bodies[no_length], no_length)]]
            for t in senders:
                t.start()
            probes = 0
            while probes == 0 or any(t.is_alive() for t in senders):
                for name, call in (("health", lambda: c.get("/health")),
                                   ("completion", lambda: c.post(CMPL, json=short))):
                    t0 = time.monotonic()
                    r = call()
                    took = time.monotonic() - t0
                    assert r.status_code == 200, r.text
                    took_all[name].append(took)
                    assert took < STALL_S, f"{name}: {took:.3f} s beside oversized requests"
                probes += 1
            for t in senders:
                t.join()
            (status, answer), took = outcomes["prompt"]
            # Refused from its length alone: tokenising it took 46 s, /health blocked throughout.
            err = _error(status, answer, 400, "maximum context length is 256")
            assert "at least" in err["message"] and took < 10, (err, took)
            (status, answer), _ = outcomes["body"]
            _error(status, answer, 413, "--max-request-body-bytes")
        deadline = time.monotonic() + 5  # freed memory is handed back on a thread
        while rss() > 1.1 * before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = rss()
    median = {name: sorted(t)[len(t) // 2] for name, t in took_all.items()}
    print(f"latency median {median}, worst {({n: max(t) for n, t in took_all.items()})} "
          f"(load average {os.getloadavg()[0]:.1f}), "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    bound = _latency_bound()
    assert all(m < bound for m in median.values()), (median, bound)
    assert after <= 1.1 * before, (before, after)


# Hostile inputs: each answered with its own 4xx at once, never a 5xx ----------------------
HOSTILE = {
    "50 MB body": (CMPL, body_50mb, 413, "--max-request-body-bytes"),
    "20 MB prompt": (CMPL, prompt_20mb, 400, "maximum context length"),
    "20 MB chat message": (CHAT, lambda: json.dumps(
        {"messages": [{"role": "user", "content": "word " * 4_000_000}]}).encode(),
        400, "maximum context length"),
    "100k content parts": (CHAT, lambda: json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "ab"}] * 100_000}]}).encode(), 400, "maximum context length"),
    "100k chat messages": (CHAT, lambda: json.dumps(
        {"messages": [{"role": "user", "content": "hi"}] * 100_000}).encode(),
        400, "maximum context length"),
    "1M token ids": (CMPL, lambda: json.dumps({"prompt": [7] * 1_000_000}).encode(), 400,
                     "maximum context length"),
    "100k prompts": (CMPL, lambda: json.dumps({"prompt": [[7]] * 100_000}).encode(), 400,
                     "at most 1024 prompts"),
    "1000 long prompts": (CMPL, lambda: json.dumps({"prompt": ["x" * 10_000] * 1000}).encode(),
                          400, "maximum context length"),
    # Each bad element of each member of a union was an error object: seconds and GBs.
    "1M bad ids": (CMPL, lambda: json.dumps({"prompt": [1.5] * 1_000_000}).encode(), 400,
                   "prompt"),
    "1M bad stop ids": (CMPL, lambda: json.dumps(
        {"prompt": "x", "stop_token_ids": [0.5] * 1_000_000}).encode(), 400, "stop_token_ids"),
    "100k bad logit_bias": (CMPL, lambda: json.dumps(
        {"prompt": "x", "logit_bias": {str(i): "x" for i in range(100_000)}}).encode(),
        400, "logit_bias"),
    "300k logprobs": (CMPL, lambda: json.dumps(
        {"prompt": ["x"] * 7, "n": 8, "max_tokens": 250, "logprobs": 20}).encode(),
        400, "logprobs"),
}


@pytest.mark.parametrize("case,framing", [(case, "length") for case in HOSTILE] + [
    ("50 MB body", "chunked"), ("20 MB prompt", "chunked"), ("20 MB chat message", "chunked")])
def test_hostile_oversized_input(server, case, framing):
    _, port, _ = server
    path, body, status, needle = HOSTILE[case]
    raw = body() if framing == "length" else chunked(body())
    t0 = time.monotonic()
    got, answer = _post_raw(port, raw, path=path, is_chunked=framing == "chunked")
    _error(got, answer, status, needle)
    assert time.monotonic() - t0 < 10


LEGAL = {
    # The chat template trims a message: 20 MB of spaces is a short prompt, and runs.
    "20 MB of spaces": (CHAT, {"messages": [{"role": "user", "content": " " * 20_000_000 + "hi"}],
                               "max_tokens": 3}, 200),
    # Under the length bound, so tokenised: fits (each <|eot|> is one token) ...
    "fits exactly": (CMPL, {"prompt": "<|eot|>" * (MAX_LEN - 2), "max_tokens": 1}, 200),
    # ... or does not, by one token: the engine's exact message, not a bound.
    "one token over": (CMPL, {"prompt": "<|eot|>" * (MAX_LEN - 1), "max_tokens": 1}, 400),
}


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("case", LEGAL)
def test_big_or_borderline_bodies_get_their_usual_answer(server, case, framing):
    _, port, _ = server
    path, body, status = LEGAL[case]
    raw = json.dumps(body).encode()
    got, answer = _post_raw(port, chunked(raw) if framing == "chunked" else raw, path=path,
                            is_chunked=framing == "chunked")
    if status == 400:
        err = _error(got, answer, 400, f"you requested {MAX_LEN + 1} tokens")
        assert "at least" not in err["message"]
    else:
        assert got == 200, answer
        assert answer["usage"]["completion_tokens"] >= 1


def test_length_bound_never_exceeds_the_real_token_count(tokenizer):
    """The bound that refuses prompts untokenised must be a true lower bound, or a prompt that
    fits would be refused."""
    vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
    assert tokenizer.max_bytes_per_token == max(map(len, vocab))
    longest = sorted(vocab, key=len)[-40:]
    pieces = [tokenizer.decode([vocab[t]], skip_special_tokens=False) for t in longest]
    rng = random.Random(0)
    texts = ["", " " * 5000, "\n" * 3000, "a" * 10_000, "<|eot|>" * 500, "".join(pieces) * 20,
             "".join(rng.choice(pieces) for _ in range(2000)),
             "".join(chr(rng.randrange(32, 0x10FFFF)) for _ in range(3000)).encode(
                 "utf-8", "ignore").decode("utf-8")]
    for text in texts:
        assert len(tokenizer.encode(text)) >= tokenizer.min_num_tokens(text), text[:50]


@pytest.mark.parametrize("change", [
    {"normalizer": {"type": "NFC"}},  # may shrink the text
    {"pre_tokenizer": {"type": "Whitespace"}},  # drops whitespace
    {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Removed"}, {"type": "ByteLevel"}]}},
    {"model": {"type": "WordPiece", "vocab": {}}},
    {"added_tokens": [{"content": "<x>", "lstrip": True}]},  # swallows the spaces before it
])
def test_no_length_bound_where_the_tokenizer_cannot_vouch_for_it(model_dir, change):
    from jaxattn.serve.tokenizer import _max_bytes_per_token

    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    assert _max_bytes_per_token(spec, None) is not None
    assert _max_bytes_per_token(dict(spec, **change), None) is None
    assert _max_bytes_per_token(spec, {"max_length": 512}) is None  # truncation
