"""Bounded soak: a fixed number of requests against the HTTP server on loopback, at a fixed
concurrency, stopping by itself.

    python -m benchmarks.soak            # GPU: the serving benchmark's model, 3000 requests
    python -m benchmarks.soak --cpu      # CPU: the embedded tiny model, 2000 requests

The plan is drawn from a seed: random prompt lengths (most short, some up to the limit, ~5%
over it), completions streamed and not, chat, n=2, greedy and seeded sampling, ~10% of the
streams dropped by their client after a few chunks and ~3% of the non-streamed requests
given up by their client (a short timeout). The KV pool is small on purpose, so sequences
are preempted and recomputed under load.

Pass criteria (exit status 1 otherwise; all in the summary JSON under benchmarks/results/):

* every request ends as planned: a complete answer (every choice its max_tokens tokens, a
  finish_reason, ``[DONE]`` for streams), OpenAI's 400 for an over-limit prompt, or the
  client's own abort; no 5xx, no other status, no transport error;
* afterwards every KV page is back in the free pool and nothing runs or waits;
* the server's resident memory grows by at most ``max(RSS_TOLERANCE_FRAC x, RSS_TOLERANCE_MIB)``
  from the sample after the first quarter of the requests to the end;
* the server compiled nothing while serving;
* a sample of the answers (greedy and seeded), re-run alone afterwards, is identical;
* (spawned server) SIGTERM at the end: the server exits with status 0 within 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import wait_healthy, write_json
from benchmarks.serving import _free_port, _metric

RSS_TOLERANCE_FRAC = 0.05
RSS_TOLERANCE_MIB = 64


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    requests: int = 3000
    concurrency: int = 64
    max_tokens: int = 128  # output lengths are uniform in [1, max_tokens]
    short_prompt: int = 256  # most prompts are uniform in [1, short_prompt]
    long_frac: float = 0.25  # the rest uniform up to the limit
    over_limit_frac: float = 0.05
    chat_frac: float = 0.1
    stream_frac: float = 0.5
    disconnect_frac: float = 0.1  # of the streams
    timeout_frac: float = 0.03  # of the non-streamed completions
    n2_frac: float = 0.1
    verify: int = 48  # answers re-run alone at the end
    # Re-runs must be token-identical (f32). In bf16 another batch means other matmul shapes,
    # so other rounding, and top-1 routing turns a router near-tie into another expert: a long
    # greedy answer can part from its re-run after a near tie (benchmarks/length_sweep.py
    # measured the first token differing in ~0.4% of packed runs). Then the re-runs must agree
    # on their first token at least ``min_first_agree`` of the time; divergences are reported.
    exact_rerun: bool = True
    min_first_agree: float = 0.9
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Planned:
    index: int
    kind: str  # "stream" | "json" | "chat"
    prompt: tuple[int, ...]
    max_tokens: int
    n: int
    seed: int | None  # None: greedy
    expect: str  # "ok" | "reject" | "disconnect" | "timeout"
    disconnect_after: int = 0  # data lines read before a "disconnect" client leaves

    def body(self) -> dict:
        body = {"max_tokens": self.max_tokens, "n": self.n, "ignore_eos": True,
                "temperature": 0.0 if self.seed is None else 0.8}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.kind == "chat":
            # Each "wN " is a few tokens of the tiny tokenizer; the over-limit ones are long.
            body["messages"] = [{"role": "user", "content": " ".join(
                f"w{t}" for t in self.prompt)}]
        else:
            body.update(prompt=list(self.prompt), return_token_ids=True,
                        stream=self.kind == "stream")
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


def plan(cfg: SoakConfig, max_model_len: int) -> list[Planned]:
    rng = np.random.default_rng(cfg.seed)
    out = []
    for i in range(cfg.requests):
        u = rng.random(6)
        kind = ("chat" if u[0] < cfg.chat_frac else
                "stream" if u[0] < cfg.chat_frac + (1 - cfg.chat_frac) * cfg.stream_frac else "json")
        max_tokens = int(rng.integers(1, cfg.max_tokens + 1))
        room = max_model_len - max_tokens
        if u[1] < cfg.over_limit_frac:
            expect = "reject"
            n_prompt = room + 1 + int(rng.integers(0, max(1, max_model_len // 4)))
        else:
            expect = "ok"
            hi = room if u[2] < cfg.long_frac else min(room, cfg.short_prompt)
            n_prompt = int(rng.integers(1, hi + 1))
            if kind == "chat":  # the template and the words' extra tokens stay under the limit
                n_prompt = max(1, min(n_prompt, room // 4 - 8))
        if kind == "stream" and expect == "ok" and u[3] < cfg.disconnect_frac:
            expect = "disconnect"
        if kind == "json" and expect == "ok" and u[3] < cfg.timeout_frac:
            expect = "timeout"
        n = 2 if u[4] < cfg.n2_frac else 1
        seed = None if u[5] < 0.5 else int(rng.integers(0, 2**31))
        out.append(Planned(i, kind, tuple(int(t) for t in rng.integers(6, 1000, n_prompt)),
                           max_tokens, n, seed, expect, int(rng.integers(1, 6))))
    return out


# One request ---------------------------------------------------------------------------------
async def _one(client, p: Planned) -> dict:
    """Run one planned request; returns {"index", "outcome", "detail", "tokens"}."""
    import httpx

    res = {"index": p.index, "outcome": None, "detail": "", "tokens": None}
    try:
        if p.kind == "stream":
            async with client.stream("POST", p.path, json=p.body()) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _judge_error(res, p, r)
                lines, done = 0, False
                tokens = [[] for _ in range(p.n)]
                finish = [None] * p.n
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        res.update(outcome="failed", detail=f"error chunk: {chunk['error']}")
                        return res
                    for c in chunk["choices"]:
                        tokens[c["index"]].extend(c.get("token_ids", []))
                        finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
                    lines += 1
                    if p.expect == "disconnect" and lines >= p.disconnect_after:
                        res.update(outcome="aborted", detail=f"left after {lines} chunks")
                        return res  # leaving the block closes the connection mid-stream
            if not done:
                res.update(outcome="failed", detail="stream ended without [DONE]")
                return res
            return _judge_ok(res, p, tokens, finish)
        timeout = httpx.Timeout(0.05) if p.expect == "timeout" else None
        kw = {"timeout": timeout} if timeout else {}
        r = await client.post(p.path, json=p.body(), **kw)
        if r.status_code != 200:
            return _judge_error(res, p, r)
        choices = r.json()["choices"]
        if p.kind == "chat":
            finish = [c["finish_reason"] for c in choices]
            ok = len(choices) == p.n and all(f == "length" for f in finish)
            res.update(outcome="ok" if ok else "failed", detail="" if ok else f"chat: {finish}")
            return res
        choices.sort(key=lambda c: c["index"])
        return _judge_ok(res, p, [c["token_ids"] for c in choices],
                         [c["finish_reason"] for c in choices])
    except httpx.TimeoutException as e:
        if p.expect == "timeout":
            res.update(outcome="aborted", detail="client timeout")
        else:
            res.update(outcome="failed", detail=f"{type(e).__name__}: {e}")
        return res
    except Exception as e:  # noqa: BLE001 - every transport or parse error is a finding
        res.update(outcome="failed", detail=f"{type(e).__name__}: {e}")
        return res


def _judge_ok(res, p: Planned, tokens, finish) -> dict:
    if p.expect == "reject":
        res.update(outcome="failed", detail="an over-limit prompt was accepted")
    elif len(tokens) != p.n or any(len(t) != p.max_tokens for t in tokens) or any(
            f != "length" for f in finish):
        res.update(outcome="failed", detail=f"incomplete: {[len(t) for t in tokens]} tokens, "
                                            f"finish {finish}, want {p.max_tokens}")
    else:
        res.update(outcome="ok", tokens=tokens)
    return res


def _judge_error(res, p: Planned, r) -> dict:
    try:
        err = r.json()["error"]
        shaped = set(err) == {"message", "type", "param", "code"}
    except Exception:  # noqa: BLE001
        err, shaped = r.text[:200], False
    if (p.expect == "reject" and r.status_code == 400 and shaped
            and "maximum context length" in err["message"]):
        res.update(outcome="rejected")
    else:
        res.update(outcome="failed", detail=f"HTTP {r.status_code}: {err}")
    res["status"] = r.status_code
    return res


# The soak ------------------------------------------------------------------------------------
def _metrics(url: str) -> dict:
    names = ("jaxattn_kv_pages_used", "jaxattn_kv_pages_free", "jaxattn_num_requests_running",
             "jaxattn_num_requests_waiting", "jaxattn_compiles", "jaxattn_num_preemptions_total")
    return {n: _metric(url, n) for n in names}


async def _wait_idle(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = await asyncio.to_thread(_metrics, url)
        idle = (m["jaxattn_kv_pages_used"] == 0 and m["jaxattn_num_requests_running"] == 0
                and m["jaxattn_num_requests_waiting"] == 0)
        if idle or time.monotonic() > deadline:
            return dict(m, idle=idle)
        await asyncio.sleep(0.1)


async def run_soak(url: str, cfg: SoakConfig, rss=None, progress: bool = True) -> dict:
    """Run the soak against a server at ``url``; ``rss()`` gives its resident bytes (or None)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        max_model_len = (await c.get("/v1/models")).json()["data"][0]["max_model_len"]
    before = await asyncio.to_thread(_metrics, url)
    planned = plan(cfg, max_model_len)
    queue: asyncio.Queue = asyncio.Queue()
    for p in planned:
        queue.put_nowait(p)
    results: list[dict] = []
    rss_samples: list[tuple[int, int]] = []
    sample_every = max(1, cfg.requests // 20)
    t0 = time.perf_counter()

    async def worker(client):
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await _one(client, p))
            done = len(results)
            if rss is not None and (done % sample_every == 0 or done == cfg.requests):
                rss_samples.append((done, rss()))
            if progress and done % max(1, cfg.requests // 10) == 0:
                print(f"soak: {done}/{cfg.requests} requests, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(cfg.concurrency)))
    load_s = time.perf_counter() - t0
    after = await _wait_idle(url)
    if rss is not None:
        rss_samples.append((cfg.requests, rss()))

    # Identical answers when re-run alone (greedy, and seeded sampling: its draws depend only
    # on the seed and the token's position, never on the batch or on preemption).
    verified, mismatches = 0, []
    ok = [r for r in sorted(results, key=lambda r: r["index"]) if r["outcome"] == "ok"
          and r["tokens"] is not None]
    pick = ok[:: max(1, len(ok) // cfg.verify)][:cfg.verify] if cfg.verify else []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for r in pick:
            p = planned[r["index"]]
            body = dict(p.body(), stream=False)
            alone = (await c.post(p.path, json=body)).json()["choices"]
            alone = [ch["token_ids"] for ch in sorted(alone, key=lambda ch: ch["index"])]
            verified += 1
            if alone != r["tokens"]:
                mismatches.append({"index": p.index, "common_prefix": [
                    next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    for a, b in zip(alone, r["tokens"])], "tokens": [len(t) for t in alone]})
    final = await _wait_idle(url)

    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    failed = [r for r in results if r["outcome"] == "failed"]
    statuses = [r.get("status", 200) for r in results if r["outcome"] != "aborted"]
    rss_check = _rss_check(rss_samples, cfg.requests)
    summary = {
        "config": dataclasses.asdict(cfg), "max_model_len": max_model_len,
        "requests": len(results), "outcomes": counts,
        "planned": {k: sum(p.expect == k for p in planned)
                    for k in ("ok", "reject", "disconnect", "timeout")},
        "http_5xx": sum(s >= 500 for s in statuses),
        "failures": [{"index": r["index"], "detail": r["detail"]} for r in failed[:20]],
        "load_seconds": load_s,
        "output_tokens": sum(len(t) for r in results if r["tokens"] for t in r["tokens"]),
        "preemptions": after["jaxattn_num_preemptions_total"]
        - before["jaxattn_num_preemptions_total"],
        "pages_used_after": after["jaxattn_kv_pages_used"],
        "pages_free_after": after["jaxattn_kv_pages_free"],
        "idle_after": after["idle"] and final["idle"],
        "compiles_after_warmup": final["jaxattn_compiles"] - before["jaxattn_compiles"],
        "verified_alone": verified, "mismatches": mismatches,
        "rss": rss_check,
    }
    first_differs = sum(any(k == 0 for k in m["common_prefix"]) for m in mismatches)
    summary["rerun_first_token_differs"] = first_differs
    rerun_ok = (not mismatches if cfg.exact_rerun
                else first_differs <= (1 - cfg.min_first_agree) * max(verified, 1))
    summary["passed"] = bool(
        not failed and summary["requests"] == cfg.requests and summary["http_5xx"] == 0
        and summary["idle_after"] and summary["pages_used_after"] == 0
        and summary["compiles_after_warmup"] == 0 and rerun_ok
        and (rss_check is None or rss_check["ok"]))
    return summary


def _rss_check(samples: list[tuple[int, int]], total: int) -> dict | None:
    if not samples:
        return None
    base = next((b for done, b in samples if done >= total // 4), samples[0][1])
    end = samples[-1][1]
    allowed = max(RSS_TOLERANCE_FRAC * base, RSS_TOLERANCE_MIB * 2**20)
    return {"base_mib": base / 2**20, "end_mib": end / 2**20,
            "growth_mib": (end - base) / 2**20, "allowed_mib": allowed / 2**20,
            "samples_mib": [(d, round(b / 2**20, 1)) for d, b in samples],
            "ok": end - base <= allowed}


def rss_of(pid: int):
    """A function returning the resident set size of process ``pid`` in bytes (Linux)."""
    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}")
    return rss


# The command line: spawn the server, soak it, stop it with SIGTERM -----------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true",
                    help="the embedded tiny model on the CPU, at a CPU-sized request count")
    ap.add_argument("--url", default=None, help="soak a running server instead of spawning one")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=300)
    args = ap.parse_args(argv)
    if args.cpu:
        cfg = SoakConfig(requests=2000, concurrency=16, max_tokens=24, short_prompt=64,
                         seed=args.seed)
        # A pool of 48 pages (3 MiB of the tiny model's 64 KiB pages) for 8 sequences of up
        # to 16 pages each: preemption happens under this load.
        server_args = ["--max-model-len", "256", "--max-num-seqs", "8",
                       "--max-num-batched-tokens", "64", "--buckets", "16,64",
                       "--kv-cache-memory", "3MiB"]
        model_dir = None
    else:
        cfg = SoakConfig(seed=args.seed, exact_rerun=False)  # bf16 model
        # The serving benchmark's model; 1 GiB of 128 KiB pages = 8192 pages (131072 tokens)
        # for 64 sequences of up to 2048 tokens: preemption happens under long prompts.
        server_args = ["--max-model-len", "2048", "--max-num-seqs", "64",
                       "--max-num-batched-tokens", "1024", "--buckets", "32,128,256,1024",
                       "--kv-cache-memory", "1GiB"]
        model_dir = "/tmp/jaxattn-bench-llama4"
        if not args.url and not os.path.exists(os.path.join(model_dir, "config.json")):
            subprocess.run([sys.executable, "-m", "benchmarks.serving", "--make-model", model_dir],
                           check=True)
        server_args += ["--model", model_dir]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("requests", args.requests),
                                                        ("concurrency", args.concurrency))
                                      if v is not None})
    proc, url, rss = None, args.url, None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "jaxattn.serve", "--port", str(port),
                                 "--log-level", "warning", *server_args])
        rss = rss_of(proc.pid)
        try:
            wait_healthy(proc, url, args.start_timeout)
        except RuntimeError as e:
            proc.kill()
            print(f"soak: {e}", file=sys.stderr)
            return 1
    try:
        summary = asyncio.run(run_soak(url, cfg, rss))
    finally:
        if proc is not None:
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 60 s"
    if proc is not None:
        summary["sigterm"] = {"exit_code": code, "seconds": time.perf_counter() - t0}
        summary["passed"] = summary["passed"] and code == 0
    summary["server_args"] = server_args if proc is not None else None
    write_json("soak-cpu.json" if args.cpu else "soak.json", summary)
    print(table(summary))
    return 0 if summary["passed"] else 1


def table(s: dict) -> str:
    o = s["outcomes"]
    rss = s["rss"]
    rows = [("requests", s["requests"]),
            ("complete / rejected (over limit) / client aborts / failed",
             f"{o.get('ok', 0)} / {o.get('rejected', 0)} / {o.get('aborted', 0)} / "
             f"{o.get('failed', 0)}"),
            ("HTTP 5xx", s["http_5xx"]),
            ("preemptions", f"{s['preemptions']:.0f}"),
            ("KV pages used after", f"{s['pages_used_after']:.0f}"),
            ("compiles after warm-up", f"{s['compiles_after_warmup']:.0f}"),
            ("re-run alone identical", f"{s['verified_alone'] - len(s['mismatches'])}"
                                      f"/{s['verified_alone']}; first token differs in "
                                      f"{s['rerun_first_token_differs']}"),
            ("RSS base -> end (allowed growth)",
             "-" if rss is None else f"{rss['base_mib']:.0f} -> {rss['end_mib']:.0f} MiB "
                                     f"(+{rss['allowed_mib']:.0f})"),
            ("output tokens / load seconds", f"{s['output_tokens']} / {s['load_seconds']:.1f}")]
    if "sigterm" in s:
        rows.append(("SIGTERM exit code", s["sigterm"]["exit_code"]))
    rows.append(("PASSED", s["passed"]))
    return "\n".join(["| soak | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


if __name__ == "__main__":
    sys.exit(main())
