"""Length sweep through the engine: every prompt-length boundary, alone and packed.

    python -m benchmarks.length_sweep          # GPU: prompts up to 131072 tokens (sweep in gpu.sh)
    python -m benchmarks.length_sweep --cpu    # CPU: the embedded tiny model, prompts up to 1025

The product exists because a server crashed once prompts passed ~10k tokens (a metadata
buffer sized for one batch shape, read for another). This drives the whole engine — admission,
chunked prefill, paged KV cache, the attention plans and kernels, decode, sampling — with:

* **singles**: one request at a time for every length of :func:`sweep_lengths` (each of
  1..256; every page and KV/Q-tile boundary +-1 — on the GPU up to one and two chunks, 8192
  and 16384 tokens; every chunk, step-budget and bucket boundary +-1 and every power of two
  +-1 up to the maximum; 9999/10000/10001; the maximum itself; a few hundred log-uniform
  random lengths). Each generates 2 greedy tokens (the prefill step and one decode step), and the
  logits of every step, on every valid row, must be finite.
* **reference**: for a sample of the lengths (every category, the longest included), the
  engine's full logits at the last prompt token and at the decoded token are compared with
  the contiguous full-sequence forward on the pure-JAX reference attention (another
  attention function, another cache layout): relative L2 error under a tolerance.
* **packed**: the same lengths again, shuffled into groups submitted together (long prompts
  in chunked prefill beside decodes, preemption when the pool runs short): every output
  agrees with its single run (same tokens, or an exact near-tie in the single run's
  logprobs; top logprobs within a tolerance).
* **limits**: a prompt of exactly ``max_model_len - 1`` with one output token runs; one more
  token is refused with a ValueError, nothing allocated.
* the engine's compile counter does not move after warm-up, and every page is free at the end.

Writes ``benchmarks/results/length-sweep[-cpu].json`` (and ``$OUT``), prints a table; exits 1 if
any check failed. ``--deadline`` stops starting new work in time, recording what was skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_json

LOGPROBS = 20  # MAX_LOGPROBS: a routing flip can move the other run's token below the top 5


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    max_len: int  # longest prompt of the boundary categories
    max_num_seqs: int
    max_num_batched_tokens: int
    buckets: tuple[int, ...]
    page_size: int = 16
    page_upto: int | None = None  # page boundaries up to here (None: max_len)
    tile_upto: int | None = None  # KV/Q tile boundaries up to here (None: max_len)
    dense_upto: int = 256
    random_count: int = 300
    pack: int = 8  # requests per packed group
    packed_frac: float = 1.0  # share of the lengths run packed too
    ref_samples: int = 24
    ref_rtol: float = 1e-4  # relative L2 error of the logits vs the reference forward
    lp_atol: float = 1e-3  # packed vs single top logprobs
    # bf16 only: a packed batch has other matmul shapes than the single run, so other
    # rounding, and top-1 routing turns a router near-tie into another expert for that
    # token. Up to ``flip_frac`` of the packed requests may differ by up to ``flip_atol``.
    flip_atol: float = 0.0
    flip_frac: float = 0.0
    impl: str = "auto"
    dtype: str | None = None
    kv_cache_memory: str | None = None
    seed: int = 0

    @property
    def max_model_len(self) -> int:
        # One page past max_len: prompts up to max_len + 1 with their 2 output tokens fit.
        return self.max_len + 2 * self.page_size


# The tiny model: chunk 256, pages of 16, KV tiles of 128; a pool of 70 pages (one longest
# sequence and 4 pages), so packed groups run out of pages and get preempted.
CPU_SPEC = SweepSpec(max_len=1024, max_num_seqs=8, max_num_batched_tokens=128,
                     buckets=(16, 128), random_count=100, pack=8, ref_samples=16,
                     impl="reference", dtype="float32", kv_cache_memory="4480KiB")
# The serving benchmark's model (Scout's layer structure, chunk 8192): every page boundary up
# to one chunk, every tile boundary up to two; the coarser boundaries up to 131072. A pool of
# two longest sequences (2 GiB of 128 KiB pages).
#
# Tolerances (bf16), measured on this model on the CPU (300-token prompt, bf16 vs f32 weights,
# the same attention): logits differ by 2.8-3.0% relative L2 (ref_rtol: two bf16 paths); the routed
# expert differs for 32 of 300 tokens (router margins have a median of 0.3 at a logit std of
# 0.8); on the tokens whose own routing did not flip the top-5 logprobs moved by at most
# 0.15 (hence lp_atol), on the flipped ones by up to 0.91 (hence flip_atol). A packing bug
# (another sequence's pages, a wrong position) moves them by whole units: the logit std is 0.9.
GPU_SPEC = SweepSpec(max_len=131072, max_num_seqs=16, max_num_batched_tokens=8192,
                     buckets=(128, 1024, 8192), page_upto=8192, tile_upto=16384,
                     packed_frac=0.5, ref_samples=20, ref_rtol=3e-2, lp_atol=0.2,
                     flip_atol=1.0, flip_frac=0.1, kv_cache_memory="2GiB")


# Which lengths ----------------------------------------------------------------------------------
def sweep_lengths(spec: SweepSpec, chunk: int, block_kv: int, block_q: int) -> dict[str, list[int]]:
    """Prompt lengths by the boundary they probe (a length may serve several categories)."""
    hi = spec.max_len

    def around(step: int, upto: int) -> list[int]:
        return [m + d for m in range(step, upto + 1, step) for d in (-1, 0, 1)]

    rng = np.random.default_rng(spec.seed)
    rand: set[int] = set()  # distinct, log-uniform: as many below 100 as between 10k and 1M
    while len(rand) < min(spec.random_count, hi):
        rand.add(int(np.exp(rng.uniform(0, math.log(hi + 1)))))
    cats = {
        "dense": list(range(1, spec.dense_upto + 1)),
        "page": around(spec.page_size, min(hi, spec.page_upto or hi)),
        "kv_tile": around(block_kv, min(hi, spec.tile_upto or hi)),
        "q_tile": around(block_q, min(hi, spec.tile_upto or hi)),
        "chunk": around(chunk, hi),
        "step_budget": around(spec.max_num_batched_tokens, hi),
        "bucket": [b + d for b in spec.buckets for d in (-1, 0, 1)],
        "pow2": [2**k + d for k in range(int(math.log2(hi)) + 1) for d in (-1, 0, 1)],
        "decimal": [9999, 10000, 10001],
        "max": [hi - 1, hi, hi + 1],
        "random": sorted(rand),
    }
    limit = spec.max_model_len - 2
    return {k: sorted({x for x in v if 1 <= x <= limit}) for k, v in cats.items()}


def prompt_for(length: int, seed: int) -> list[int]:
    # Ordinary token ids (above the tiny tokenizer's 6 special tokens), one stream per length.
    return np.random.default_rng([seed, length]).integers(6, 1000, length).tolist()


# The engine, with every step's logits checked ---------------------------------------------------
@jax.jit
def _finite_rows(logits, num_seqs):
    valid = jnp.arange(logits.shape[0])[:, None] < num_seqs
    return jnp.all(jnp.isfinite(logits) | ~valid)


class LogitsCheck:
    """Checks every step's logits (valid rows) for NaN/inf and keeps the last two steps' first
    rows for the caller (wrapping a Llama4Runner's forward; the check compiles with the steps, at
    warm-up)."""

    def __init__(self, runner):
        self.steps = 0
        self.nonfinite_steps = 0
        self.recent: list = []
        forward = runner.forward

        def checked(batch, prev_tokens=None):
            logits = forward(batch, prev_tokens)
            self.steps += 1
            if not bool(_finite_rows(logits, batch.num_seqs)):
                self.nonfinite_steps += 1
            # A copy: the runner writes the next step's logits into this buffer.
            self.recent = (self.recent + [logits[0]])[-2:]
            return logits

        runner.forward = checked


def build_engine(spec: SweepSpec, model_dir: str | None):
    from jaxattn.serve.config import EngineConfig
    from jaxattn.serve.engine import LLMEngine
    from jaxattn.serve.model_runner import Llama4Runner

    config = EngineConfig(max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
                          max_num_batched_tokens=spec.max_num_batched_tokens,
                          page_size=spec.page_size, kv_cache_memory=spec.kv_cache_memory,
                          buckets=spec.buckets, enable_prefix_caching=False,
                          attention_impl=spec.impl)
    if model_dir is None:
        from jaxattn.serve import default_model
        model_dir = default_model.default_model_dir()
    from jaxattn.models import llama4

    model = llama4.load(model_dir, dtype=spec.dtype)
    runner = Llama4Runner(model, config)
    check = LogitsCheck(runner)
    return LLMEngine(runner, None), check, model


# The reference: the contiguous full-sequence forward, logits at chosen rows only ---------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reference_logits(graphdef, state, ids, rows):
    """Logits [len(rows), vocab] of the full causal forward over ``ids`` [1, L] on the pure-JAX
    reference attention (the model's own layers; only the rows asked for go through the head,
    since [L, vocab] at 131072 x 202048 would not fit)."""
    from flax import nnx

    import jaxattn

    model = nnx.merge(graphdef, state)
    x = model.embed(ids)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)

    def attend(i, attn, q, k, v):
        return jaxattn.attention(q, k, v, causal=True, chunk_size=attn.chunk_size,
                                 scale=attn.scale, impl="reference")

    h = model.run_layers(x, positions, attend)  # [1, L, hidden]
    return model.logits(h[0, rows])


def reference_logits(model, tokens: list[int], rows: list[int]) -> np.ndarray:
    from flax import nnx

    # Right-padding (to 8 sizes per octave, so at most 1/8 extra work) bounds the number of
    # compiles; causal attention keeps the padding out of every real row, and the MoE routes
    # each token on its own.
    grain = max(16, 1 << max(0, (len(tokens) - 1).bit_length() - 3))
    padded = -(-len(tokens) // grain) * grain
    ids = np.zeros((1, padded), np.int32)
    ids[0, :len(tokens)] = tokens
    graphdef, state = nnx.split(model)
    return np.asarray(_reference_logits(graphdef, state, ids, np.asarray(rows, np.int32)))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# Running requests ---------------------------------------------------------------------------------
def _params():
    from jaxattn.serve.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=LOGPROBS)


def run_requests(engine, items: list[tuple[str, list[int]]], params) -> dict[str, dict]:
    """Submit all ``items`` at once, step until they finish; per request: tokens, logprobs."""
    out = {rid: {"tokens": [], "logprobs": [], "error": None} for rid, _ in items}
    for rid, prompt in items:
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for d in engine.step():
            r = out[d.request_id]
            r["tokens"].extend(d.token_ids)
            r["logprobs"].extend(d.logprobs or ())
            if d.error:
                r["error"] = d.error
    return out


def _agree_steps(single: dict, packed: dict, atol: float) -> str | None:
    """``_agree`` on the first output token and, when it is the same token (same context),
    on the second."""
    why = _agree(single["logprobs"][0], packed["logprobs"][0], atol)
    if why is None and single["tokens"][0] == packed["tokens"][0]:
        why = _agree(single["logprobs"][1], packed["logprobs"][1], atol)
    return why


def _agree(a, b, atol: float) -> str | None:
    """None if two runs' first-token TokenLogprobs agree, else why not. Tokens must be equal, or
    an exact tie within ``atol`` under both runs' logprobs; shared top logprobs within ``atol``."""
    ta, tb = dict(a.top), dict(b.top)
    if a.token_id != b.token_id:  # a tie seen from either run's top logprobs
        if not ((b.token_id in ta and abs(ta[b.token_id] - a.logprob) <= atol)
                or (a.token_id in tb and abs(tb[a.token_id] - b.logprob) <= atol)):
            return f"token {a.token_id} vs {b.token_id} (no tie within {atol})"
    diffs = [abs(ta[t] - tb[t]) for t in ta.keys() & tb.keys()]
    if not diffs or max(diffs) > atol:
        return f"top logprobs differ by {max(diffs, default=float('inf')):.3g} > {atol}"
    return None


# The sweep ---------------------------------------------------------------------------------------
def run_sweep(engine, check, model, spec: SweepSpec, *, deadline_s: float = 1e9,
              log=print) -> dict:
    t_start = time.perf_counter()
    b = engine.bounds
    skipped: list[str] = []

    def time_left(what: str) -> bool:
        if time.perf_counter() - t_start < deadline_s:
            return True
        skipped.append(what)
        return False

    t0 = time.perf_counter()
    engine.warmup(progress=False)
    warmup_s, warm = time.perf_counter() - t0, engine.compile_count
    cats = sweep_lengths(spec, b.chunk_size or spec.max_len, b.block_kv, b.block_q)
    lengths = sorted({x for v in cats.values() for x in v})
    # The long boundaries first: a run cut short by the deadline still covers the lengths the
    # product exists for.
    first = set(cats["chunk"] + cats["pow2"] + cats["decimal"] + cats["max"] + cats["step_budget"])
    order = sorted(first, reverse=True) + [x for x in lengths if x not in first]
    params = _params()
    failures: list[dict] = []
    singles: dict[int, dict] = {}
    nonfinite: list[int] = []

    # The reference sample: one length of every category, the shortest and the longest, and
    # random others up to ref_samples.
    rng = np.random.default_rng(spec.seed + 1)
    ref_set = {min(lengths), max(lengths)}
    ref_set.update(int(rng.choice(v)) for v in cats.values() if v)
    rest = [x for x in lengths if x not in ref_set]
    ref_set.update(rng.choice(rest, size=min(len(rest), max(0, spec.ref_samples - len(ref_set))),
                              replace=False).tolist())
    ref_logits: dict[int, np.ndarray] = {}

    log(f"sweep: {len(lengths)} lengths up to {max(lengths)} (max_model_len {b.max_model_len}), "
        f"warm-up {warmup_s:.1f} s, {warm} compiles")
    t0 = time.perf_counter()
    for i, n in enumerate(order):
        if not time_left(f"singles from length {n} ({len(order) - i} left)"):
            break
        bad = check.nonfinite_steps
        try:
            r = run_requests(engine, [(f"L{n}", prompt_for(n, spec.seed))], params)[f"L{n}"]
        except Exception as e:  # noqa: BLE001 - record, go on with the other lengths
            failures.append({"length": n, "phase": "single", "error": f"{type(e).__name__}: {e}"})
            continue
        if r["error"] or len(r["tokens"]) != 2:
            failures.append({"length": n, "phase": "single", "error": r["error"] or
                             f"{len(r['tokens'])} tokens"})
            continue
        if check.nonfinite_steps != bad:
            nonfinite.append(n)
        singles[n] = r
        if n in ref_set:  # [2, vocab]: logits at the last prompt token and at the decoded one
            ref_logits[n] = np.stack([np.asarray(x) for x in check.recent])
        if (i + 1) % 200 == 0:
            log(f"sweep: {i + 1}/{len(order)} singles, {time.perf_counter() - t0:.0f} s")
    singles_s = time.perf_counter() - t0

    # Reference forward on the sample.
    t0 = time.perf_counter()
    ref_checks = []
    for n in sorted(ref_logits, reverse=True):
        if not time_left(f"reference at length {n}"):
            break
        tokens = prompt_for(n, spec.seed) + [singles[n]["tokens"][0]]
        try:
            ref = reference_logits(model, tokens, [n - 1, n])
        except Exception as e:  # noqa: BLE001
            failures.append({"length": n, "phase": "reference", "error": f"{type(e).__name__}: {e}"})
            continue
        errs = [_rel_err(ref_logits[n][j], ref[j]) for j in range(2)]
        ref_checks.append({"length": n, "prefill_rel_err": errs[0], "decode_rel_err": errs[1]})
        if max(errs) > spec.ref_rtol:
            failures.append({"length": n, "phase": "reference",
                             "error": f"relative error {max(errs):.3g} > {spec.ref_rtol}"})
    ref_s = time.perf_counter() - t0

    # Packed groups of shuffled lengths.
    t0 = time.perf_counter()
    packed_lengths = [n for n in lengths if n in singles]
    rng.shuffle(packed_lengths)
    packed_lengths = packed_lengths[:int(len(packed_lengths) * spec.packed_frac)]
    packed_runs, preempt0 = 0, engine.scheduler.num_preemptions
    routing_sensitive = []  # packed runs beyond lp_atol but within flip_atol
    for g in range(0, len(packed_lengths), spec.pack):
        group = packed_lengths[g:g + spec.pack]
        if not time_left(f"packed groups from {g} ({len(packed_lengths) - g} lengths left)"):
            break
        bad = check.nonfinite_steps
        try:
            res = run_requests(engine, [(f"P{n}", prompt_for(n, spec.seed)) for n in group], params)
        except Exception as e:  # noqa: BLE001
            failures.append({"lengths": group, "phase": "packed", "error": f"{type(e).__name__}: {e}"})
            continue
        if check.nonfinite_steps != bad:
            nonfinite.extend(group)
        for n in group:
            r, s = res[f"P{n}"], singles[n]
            packed_runs += 1
            why = r["error"] or (None if len(r["tokens"]) == 2 else f"{len(r['tokens'])} tokens")
            if why:
                failures.append({"length": n, "phase": "packed", "error": why})
                continue
            why = _agree_steps(s, r, spec.lp_atol)
            if why and spec.flip_atol and not _agree_steps(s, r, spec.flip_atol):
                routing_sensitive.append({"length": n, "error": why})
            elif why:
                failures.append({"length": n, "phase": "packed", "error": why})
    if len(routing_sensitive) > spec.flip_frac * packed_runs:
        failures.append({"phase": "packed", "error": (
            f"{len(routing_sensitive)} of {packed_runs} packed runs beyond {spec.lp_atol} "
            f"(more than the {spec.flip_frac:.0%} a routing near-tie explains)")})
    packed_s = time.perf_counter() - t0

    # Admission at the limit.
    from jaxattn.serve.sampling_params import SamplingParams

    limits = {}
    top = b.max_model_len - 1
    try:
        r = run_requests(engine, [("limit", prompt_for(top, spec.seed))],
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))["limit"]
        limits["runs_at_max_model_len"] = r["error"] is None and len(r["tokens"]) == 1
    except Exception as e:  # noqa: BLE001
        limits["runs_at_max_model_len"] = f"{type(e).__name__}: {e}"
    for name, n, m in (("refused_one_past", top, 2), ("refused_prompt_at_limit", top + 1, 1)):
        used = engine.bm.num_used_pages
        try:
            engine.add_request(name, prompt_for(n, spec.seed), SamplingParams(max_tokens=m))
            limits[name] = False
            engine.abort(name)
        except ValueError:
            limits[name] = engine.bm.num_used_pages == used and not engine.has_unfinished()
    for k, v in limits.items():
        if v is not True:
            failures.append({"phase": "limits", "error": f"{k}: {v}"})

    compiles_after = engine.compile_count - warm
    pages_leaked = engine.bm.num_used_pages
    engine.bm.check()
    if nonfinite:
        failures.append({"phase": "finite", "error": f"non-finite logits at lengths {nonfinite[:20]}"})
    if compiles_after:
        failures.append({"phase": "compiles", "error": f"{compiles_after} compiles after warm-up"})
    if pages_leaked:
        failures.append({"phase": "pages", "error": f"{pages_leaked} pages still used"})
    return {
        "spec": dataclasses.asdict(spec), "max_model_len": b.max_model_len,
        "bounds": {k: getattr(b, k) for k in ("chunk_size", "block_q", "block_kv", "page_size",
                                              "max_num_batched_tokens", "max_num_seqs")},
        "device": str(jax.devices()[0]), "impl": spec.impl,
        "attention_impl_resolved": _resolved_impl(spec.impl, b, model.dtype),
        "categories": {k: len(v) for k, v in cats.items()},
        "lengths": len(lengths), "max_length": max(lengths),
        "singles_run": len(singles), "packed_runs": packed_runs,
        "packed_routing_sensitive": len(routing_sensitive),
        "routing_sensitive": routing_sensitive[:50],
        "packed_preemptions": engine.scheduler.num_preemptions - preempt0,
        "engine_steps": check.steps, "nonfinite_lengths": sorted(set(nonfinite)),
        "reference_checks": len(ref_checks),
        "reference_max_rel_err": max((max(c["prefill_rel_err"], c["decode_rel_err"])
                                      for c in ref_checks), default=None),
        "reference": ref_checks, "limits": limits,
        "compiles_after_warmup": compiles_after, "pages_leaked": pages_leaked,
        "seconds": {"warmup": warmup_s, "singles": singles_s, "reference": ref_s,
                    "packed": packed_s, "total": time.perf_counter() - t_start + warmup_s},
        "skipped": skipped, "failures": failures[:50], "num_failures": len(failures),
        "passed": not failures and not skipped,
    }


def _resolved_impl(impl: str, bounds, dtype) -> str:
    """What ``impl`` runs for these bounds ("auto" falls back to the reference where the
    kernels cannot serve them; the summary must say which one was swept)."""
    try:
        from jaxattn import api

        return api._kernel_impl(impl, bounds.head_dim, dtype, bounds)
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def table(s: dict) -> str:
    rows = [("device / attention", f"{s['device']} / {s['attention_impl_resolved']}"),
            ("lengths (max)", f"{s['lengths']} ({s['max_length']})"),
            ("single requests run", s["singles_run"]),
            ("packed requests run (preemptions)", f"{s['packed_runs']} ({s['packed_preemptions']})"),
            ("packed beyond the noise floor, within a routing flip",
             f"{s['packed_routing_sensitive']}"),
            ("engine steps", s["engine_steps"]),
            ("lengths with non-finite logits", len(s["nonfinite_lengths"])),
            ("reference checks (max rel. L2 error)",
             f"{s['reference_checks']} ({s['reference_max_rel_err'] or 0:.2e})"),
            ("limits", ", ".join(f"{k}={v}" for k, v in s["limits"].items())),
            ("compiles after warm-up", s["compiles_after_warmup"]),
            ("pages leaked", s["pages_leaked"]),
            ("failures / skipped", f"{s['num_failures']} / {len(s['skipped'])}"),
            ("seconds (warm-up, singles, reference, packed)",
             ", ".join(f"{s['seconds'][k]:.0f}" for k in ("warmup", "singles", "reference", "packed"))),
            ("PASSED", s["passed"])]
    return "\n".join(["| length sweep | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the embedded tiny model, CPU bounds")
    ap.add_argument("--model", default=None,
                    help="model directory (GPU default: the serving benchmark's model)")
    ap.add_argument("--impl", default=None, help="attention implementation (default: auto on the "
                    "GPU, reference on the CPU)")
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=480,
                    help="seconds after warm-up to stop starting new work")
    args = ap.parse_args(argv)
    spec = CPU_SPEC if args.cpu else GPU_SPEC
    if args.impl:
        spec = dataclasses.replace(spec, impl=args.impl)
    if args.max_len:
        spec = dataclasses.replace(spec, max_len=args.max_len)
    model_dir = args.model
    if not args.cpu and model_dir is None:
        import subprocess

        model_dir = "/tmp/jaxattn-bench-llama4"
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            subprocess.run([sys.executable, "-m", "benchmarks.serving", "--make-model", model_dir],
                           check=True)
    engine, check, model = build_engine(spec, model_dir)
    summary = run_sweep(engine, check, model, spec, deadline_s=args.deadline,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    summary["model_dir"] = model_dir or "embedded tiny model"
    write_json("length-sweep-cpu.json" if args.cpu else "length-sweep.json", summary)
    print(table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
