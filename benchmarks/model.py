"""Llama 4 Scout-width slice: transformers (torch bf16, sdpa) vs jaxattn, one run, one GPU.

    python -m benchmarks.model [--layers 4] [--deadline-s 420]

Random weights at Scout's real widths (hidden 5120, 40/8 heads, head_dim 128, 16
experts top-1, intermediate 8192, vocab 202048, chunk 8192, NoPE every 4th layer),
``--layers`` decoder layers. The weights are made once in JAX and shared with the
transformers model through DLPack (zero copy; only HF's fused ``gate_up_proj`` is a
concatenated copy), so both compute with the same numbers.

Measured, medians of timed repeats after a warm-up (compile) call:
* prefill tokens/s of one prompt of 8k/16k/32k tokens: transformers ``forward``
  (``logits_to_keep=1``, no cache) vs the jaxattn serving step (paged cache write +
  attention + last-token logits);
* decode step time at batch 1 and 32 over an 8192-token context: transformers with a
  ``DynamicCache`` vs jaxattn: the serving engine's whole step (async scheduling on and
  off), the model step pipelined as the engine runs it, and one step alone; against the
  roofline = bytes that must be read
  (weights of the attention, shared expert, the experts the batch can hit, LM head; the
  visible KV) / the copy bandwidth measured in this run;
* the routed-expert grouped matmul alone (``lax.ragged_dot``) against a dense matmul of
  the same useful FLOPs, to show whether XLA runs it as a grouped GEMM.

Writes ``benchmarks/results/model-<date>.json`` and ``.md``. Items that would pass
the deadline are skipped and listed, so a partial run still reports what it measured.
"""

from __future__ import annotations

import os
import sys

# JAX must not grab 75% of the GPU up front: torch shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# transformers probes for a package named `kernels`; with the repo root on sys.path it
# would find this project's kernels/ folder (imported as jaxattn.kernels) instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxattn  # noqa: E402
from jaxattn.api import _kernel_impl  # noqa: E402
from jaxattn.kernels import grouped_matmul  # noqa: E402
from jaxattn.models import llama4  # noqa: E402
from jaxattn.serve import kv_cache, paged_step, sampling  # noqa: E402
from jaxattn.serve.batch import SeqStep, build_step, pack  # noqa: E402
from jaxattn.serve.config import EngineConfig  # noqa: E402

from benchmarks.common import trace_summary  # noqa: E402
from benchmarks.roofline import decode_bytes  # noqa: E402

PREFILL_LENS = (8192, 16384, 32768)
DECODE_BATCHES = (1, 32)
DECODE_CONTEXT = 8192  # kv_len of each decoding sequence (all inside the first chunk)
PAGE_SIZE = 64
RESULTS = os.path.join(_ROOT, "benchmarks", "results")


def scout_config(layers: int) -> dict:
    """Llama-4-Scout-17B-16E's text config with fewer layers (NoPE pattern kept: every 4th)."""
    return dict(
        model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
        intermediate_size_mlp=16384, num_hidden_layers=layers, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8192, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1, use_qk_norm=True, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                             low_freq_factor=1.0, high_freq_factor=1.0,
                             original_max_position_embeddings=8192),
        max_position_embeddings=10485760, tie_word_embeddings=False, bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008], pad_token_id=200018)


class Clock:
    def __init__(self, deadline_s: float):
        self.t0, self.deadline = time.perf_counter(), deadline_s
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.t0)

    def allow(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append(f"{what} (needs ~{need_s:.0f}s, {self.left():.0f}s left)")
        print(f"skip {what}: {self.left():.0f}s left", flush=True)
        return False


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device copy (XLA elementwise add), the
    measurement of docs' anchors."""
    x = jnp.ones((2**30,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    t = median_time(lambda: f(x).block_until_ready(), 10)
    del x
    return 2 * 4 * 2**30 / t


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------
def build_hf(model: llama4.Llama4ForCausalLM, hf_dict: dict):
    """A transformers Llama4ForCausalLM (bf16, sdpa, cuda) whose weights are the JAX arrays."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    config = Llama4TextConfig(**{k: v for k, v in hf_dict.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Llama4ForCausalLM(config)
    from jaxattn.models.llama4.loader import _variable

    for t in llama4.tensor_map(model.config):
        parts = [torch.from_dlpack(_variable(model, p).get_value()) for p in t.targets]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=t.split_axis)
        owner, attr = t.name.rsplit(".", 1)
        setattr(hf.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    with torch.device("cuda"):
        hf.model.rotary_emb = Llama4TextRotaryEmbedding(config=config)
    meta = [n for n, x in list(hf.named_parameters()) + list(hf.named_buffers()) if x.is_meta]
    assert not meta, f"parameters left on meta: {meta[:5]}"
    return hf.eval()


def bench_hf(hf, clock: Clock, vocab: int, out: dict):
    import torch
    from transformers import DynamicCache

    rng = torch.Generator(device="cuda").manual_seed(0)
    sync = torch.cuda.synchronize
    for n in PREFILL_LENS:
        if not clock.allow(f"transformers prefill {n}", 25 + n / 1000):
            continue
        ids = torch.randint(0, vocab, (1, n), device="cuda", generator=rng)

        def run():
            with torch.inference_mode():
                hf(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync()

        try:
            torch.cuda.reset_peak_memory_stats()
            run()
            t = median_time(run, 2)
            out.setdefault("prefill", {})[n] = dict(
                hf_s=t, hf_tok_s=n / t,
                hf_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            print(f"transformers prefill {n}: {t * 1e3:.1f} ms, {n / t:,.0f} tok/s", flush=True)
        except torch.OutOfMemoryError as e:
            out.setdefault("prefill", {})[n] = dict(hf_error=f"OOM: {str(e)[:120]}")
            print(f"transformers prefill {n}: OOM", flush=True)
        del ids
        torch.cuda.empty_cache()
    cfg = hf.config
    for b in DECODE_BATCHES:
        if not clock.allow(f"transformers decode batch {b}", 30):
            continue
        try:
            cache = DynamicCache(config=cfg)
            shape = (b, cfg.num_key_value_heads, DECODE_CONTEXT - 1, cfg.head_dim)
            for i in range(cfg.num_hidden_layers):
                k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=rng)
                cache.update(k, torch.randn_like(k), i)
            ids = torch.randint(0, vocab, (b, 1), device="cuda", generator=rng)
            pos = [DECODE_CONTEXT - 1]

            def step():
                with torch.inference_mode():
                    hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                       position_ids=torch.full((b, 1), pos[0], device="cuda"))
                pos[0] += 1
                sync()

            step()
            t = median_time(step, 5)
            out.setdefault("decode", {})[b] = dict(hf_ms=t * 1e3)
            print(f"transformers decode batch {b}: {t * 1e3:.2f} ms", flush=True)
            del cache
        except Exception as e:  # noqa: BLE001 -- a baseline failure must not end the run
            out.setdefault("decode", {})[b] = dict(hf_error=f"{type(e).__name__}: {str(e)[:160]}")
            print(f"transformers decode batch {b}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# jaxattn
# ---------------------------------------------------------------------------------------
def _decode_batch(cfg, bounds, b: int, num_pages: int, rng):
    """Batch ``b`` of one-token decodes over DECODE_CONTEXT cached tokens each."""
    per_seq = -(-DECODE_CONTEXT // PAGE_SIZE)
    seqs = [SeqStep([int(rng.integers(cfg.vocab_size))], DECODE_CONTEXT - 1,
                    list(range(i * per_seq, (i + 1) * per_seq))) for i in range(b)]
    return build_step(bounds, b, seqs, num_pages=num_pages)


def time_decode(step, kv: list, batch) -> dict:
    """Step time (dispatch to logits ready), first-call time, and the host's share: the
    dispatch (until the step is enqueued), and within it packing + copying the batch."""
    def run():
        logits, kv[0] = step(kv[0], batch)
        logits.block_until_ready()

    t0 = time.perf_counter()
    run()
    first_s = time.perf_counter() - t0
    t = median_time(run, 10)
    dispatch, put = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        logits, kv[0] = step(kv[0], batch)
        dispatch.append(time.perf_counter() - t0)
        logits.block_until_ready()
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(pack(batch)))
        put.append(time.perf_counter() - t0)
    return dict(jax_ms=t * 1e3, jax_first_call_s=first_s,
                jax_dispatch_ms=statistics.median(dispatch) * 1e3,
                jax_batch_put_ms=statistics.median(put) * 1e3,
                jax_pipelined_ms=time_pipelined(step, kv, batch) * 1e3, run=run)


def time_pipelined(step, kv: list, batch, steps: int = 20) -> float:
    """Seconds per decode step as the engine's async scheduling runs them: step n+1 (with
    greedy sampling) is enqueued before step n's tokens are fetched to the host, its input
    tokens read on the device from step n's draws."""
    b = int(batch.num_seqs)
    ids = np.array(batch.token_ids)
    ids[:b] = -1 - np.arange(b)  # one token per sequence: row i of the previous draws
    chained = batch._replace(token_ids=ids)
    rows = sampling.SamplingBatch.build([sampling.GREEDY_ROW] * b, len(batch.kv_lens))

    def run():
        tokens = None
        for _ in range(steps):
            logits, kv[0] = step(kv[0], batch if tokens is None else chained, prev_tokens=tokens)
            drawn = sampling.draw(logits, rows, False, b).token_ids
            if tokens is not None:
                jax.device_get(tokens)  # the host learns step n's tokens after n+1 is enqueued
            tokens = drawn
        jax.device_get(tokens)

    run()
    return median_time(run, 5) / steps


def bench_engine(model, clock: Clock, out: dict):
    """Decode through the serving engine (same weights): once every sequence of a batch of
    DECODE_CONTEXT-1-token prompts decodes, wall ms per step, async scheduling on and off.
    The whole engine step is in it: scheduling, batch building, sampling, detokenizing
    (none here), bookkeeping."""
    from jaxattn.serve.engine import LLMEngine
    from jaxattn.serve.model_runner import Llama4Runner
    from jaxattn.serve.sampling_params import SamplingParams

    # While the last sequence of a batch prefills, the first ones already decode (one
    # prefill chunk per step): room for that, then a window of steps in which all decode.
    window = 16
    tokens = max(DECODE_BATCHES) + window + 8
    config = EngineConfig(max_model_len=DECODE_CONTEXT + tokens, max_num_seqs=max(DECODE_BATCHES),
                          max_num_batched_tokens=DECODE_CONTEXT, page_size=PAGE_SIZE,
                          buckets=(max(DECODE_BATCHES), DECODE_CONTEXT))
    pages = max(DECODE_BATCHES) * -(-(DECODE_CONTEXT + tokens) // PAGE_SIZE)
    runner = Llama4Runner(model, config, num_pages=pages)
    rng = np.random.default_rng(1)
    if not clock.allow("engine decode (compiles 2 buckets)", 90):
        return
    for async_scheduling in (True, False):
        engine = LLMEngine(runner, None, config.replace(async_scheduling=async_scheduling))
        engine.warmup(progress=False)  # compiles for the first engine; the second reuses them
        warm = engine.compile_count
        name = "engine_async_ms" if async_scheduling else "engine_sync_ms"
        for b in DECODE_BATCHES:
            if not clock.allow(f"engine decode batch {b} ({name})", 20):
                continue
            ids = [f"{b}-{i}" for i in range(b)]
            for i, rid in enumerate(ids):
                # Sampled at temperature 1 (random weights: near-uniform tokens), closer to the
                # roofline's random routing than greedy decoding. How many experts the engine's
                # tokens hit is not measured: at batch 32 it may be fewer than the roofline's.
                params = SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True)
                prompt = rng.integers(model.config.vocab_size, size=DECODE_CONTEXT - 1)
                engine.add_request(rid, prompt.tolist(), params)
            started = set()
            while len(started) < b:  # prefill, until every sequence has its first token
                started.update(d.request_id for d in engine.step() if d.token_ids)
            engine.step()  # with async scheduling: the first step of the window is in flight
            t0 = time.perf_counter()
            for _ in range(window):
                assert len(engine.step()) == b  # every sequence gains a token
            out.setdefault("decode", {}).setdefault(b, {})[name] = (
                (time.perf_counter() - t0) / window * 1e3)
            for rid in ids:
                engine.abort(rid)
            print(f"engine decode batch {b}, async={async_scheduling}: "
                  f"{out['decode'][b][name]:.2f} ms/step", flush=True)
        out.setdefault("engine_compiles_after_warmup", {})[name] = engine.compile_count - warm
        del engine
    del runner


# XLA options the decode step is also timed with (serve/paged_step.py picks ours).
STEP_OPTION_VARIANTS = {"xla default": {}, "no CUDA graphs": {"xla_gpu_enable_command_buffer": ""}}


def bench_jax(model, clock: Clock, out: dict, save=lambda: None, impl: str = "auto",
              prefill_lens=PREFILL_LENS, variants=True):
    cfg = model.config
    bounds = EngineConfig(max_num_seqs=max(DECODE_BATCHES), max_num_batched_tokens=max(PREFILL_LENS),
                          max_model_len=max(max(PREFILL_LENS), DECODE_CONTEXT),
                          page_size=PAGE_SIZE).bounds(cfg)
    pages_per_decode_seq = -(-DECODE_CONTEXT // PAGE_SIZE)
    num_pages = max(max(DECODE_BATCHES) * pages_per_decode_seq, max(PREFILL_LENS) // PAGE_SIZE)
    spec = paged_step.cache_spec(cfg, num_pages=num_pages, page_size=PAGE_SIZE, dtype=jnp.bfloat16)
    out["kv_cache_gib"] = spec.total_bytes / 2**30
    kv = [kv_cache.allocate(spec)]
    step = paged_step.make_step_fn(model, bounds, impl=impl)
    rng = np.random.default_rng(0)

    def run(batch):
        logits, kv[0] = step(kv[0], batch)
        logits.block_until_ready()

    for b in DECODE_BATCHES:
        if not clock.allow(f"jaxattn decode batch {b}", 45):  # first call ~32 s with kernels
            continue
        batch = _decode_batch(cfg, bounds, b, num_pages, rng)
        r = time_decode(step, kv, batch)
        out.setdefault("decode", {}).setdefault(b, {}).update(
            {k: v for k, v in r.items() if k != "run"})
        try:
            out["decode"][b]["jax_trace"] = trace_summary(r["run"])
        except Exception as e:  # noqa: BLE001 -- the profile is extra evidence, not the number
            out["decode"][b]["jax_kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"jaxattn decode batch {b}: {r['jax_ms']:.2f} ms (first call "
              f"{r['jax_first_call_s']:.1f}s, dispatch {r['jax_dispatch_ms']:.2f} ms)", flush=True)
        save()
    for name, options in STEP_OPTION_VARIANTS.items() if variants else ():
        if not clock.allow(f"jaxattn decode, {name}", 60):
            continue
        vstep = paged_step.make_step_fn(model, bounds, impl=impl, compiler_options=options)
        for b in DECODE_BATCHES:
            r = time_decode(vstep, kv, _decode_batch(cfg, bounds, b, num_pages, rng))
            out.setdefault("decode_variants", {}).setdefault(name, {})[b] = {
                k: v for k, v in r.items() if k != "run"}
            print(f"jaxattn decode batch {b}, {name}: {r['jax_ms']:.2f} ms", flush=True)
        del vstep
        save()
    for n in prefill_lens:
        if not clock.allow(f"jaxattn prefill {n}", 45 + n / 1000):
            continue
        seq = SeqStep(rng.integers(cfg.vocab_size, size=n).tolist(), 0,
                      list(range(-(-n // PAGE_SIZE))))
        batch = build_step(bounds, n, [seq], num_pages=num_pages)
        t0 = time.perf_counter()
        run(batch)
        compile_s = time.perf_counter() - t0
        t = median_time(lambda: run(batch), 3)
        out.setdefault("prefill", {}).setdefault(n, {}).update(
            jax_s=t, jax_tok_s=n / t, jax_first_call_s=compile_s)
        print(f"jaxattn prefill {n}: {t * 1e3:.1f} ms, {n / t:,.0f} tok/s "
              f"(first call {compile_s:.1f}s)", flush=True)
        out["jax_compiles"] = step.jitted._cache_size()
        save()


def grouped_matmul_micro(clock: Clock, out: dict):
    """The routed-expert grouped matmul alone: XLA's ragged_dot, JAX's Mosaic ragged_dot
    example, and the model's kernel (grouped_matmul.py), vs a dense matmul of the same
    useful FLOPs; plus tile configs of the model's kernel (:func:`grouped_matmul_tiles`)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    e, h, inter = 16, 5120, 8192
    key = jax.random.key(0)
    w = jax.random.normal(key, (e, h, inter), jnp.bfloat16)
    xla = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs))
    ours = jax.jit(lambda x, w, gs: grouped_matmul.grouped_matmul(x, w, gs, impl="mosaic"))
    jax_example = jax.jit(lambda x, w, gs: ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=gs, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
        grid_block_n=1))
    w0 = w[0]  # one expert's matrix as its own array (a slice inside the jit is a copy)
    dense = jax.jit(lambda x, w0: x @ w0)
    rows = []
    for m in (1, 32, 8192, 32768):
        if not clock.allow(f"grouped matmul m={m}", 20):
            continue
        x = jax.random.normal(jax.random.fold_in(key, m), (m, h), jnp.bfloat16)
        experts = np.sort(np.random.default_rng(m).integers(0, e, m))
        gs = jnp.asarray(np.bincount(experts, minlength=e).astype(np.int32))
        want = xla(x, w, gs).astype(jnp.float32)
        row = dict(m=m, experts_hit=int((np.bincount(experts, minlength=e) > 0).sum()),
                   dense_same_flops_ms=median_time(
                       lambda: dense(x, w0).block_until_ready(), 10) * 1e3)
        for name, f in (("xla", xla), ("jax_example", jax_example), ("ours", ours)):
            try:
                # Relative to the largest output: bf16 outputs of ~100s differ by one ulp (1.0)
                # when K is split (f32 partial sums added in another order).
                err = float(jnp.abs(f(x, w, gs).astype(jnp.float32) - want).max()
                            / jnp.abs(want).max())
                row[f"{name}_ms"] = median_time(lambda: f(x, w, gs).block_until_ready(), 10) * 1e3
                row[f"{name}_max_rel_err"] = err
            except Exception as ex:  # noqa: BLE001 -- record and go on
                row[f"{name}_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        rows.append(row)
        print("grouped matmul", {k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in row.items()}, flush=True)
    out["grouped_matmul"] = rows
    del w0
    out["grouped_matmul_tiles"] = grouped_matmul_tiles(clock, w)
    del w


# Tile configs tried for the grouped matmul: decode (rows, K, N), where the kernel should
# read the experts hit at copy bandwidth, and the prefill size.
_DECODE_TILES = [dict(block_m=64, block_k=bk, max_concurrent_steps=st, k_splits=ks)
                 for bk, st in ((64, 4), (128, 4)) for ks in (1, 2, 4)]
_PREFILL_TILES = [dict(grid_block_n=8), dict(grid_block_n=1)]


def grouped_matmul_tiles(clock: Clock, w_gate) -> list[dict]:
    """Tile configs of the model's kernel (``GroupedMatmulConfig``), with the weight bytes
    of the experts hit per second for the decode sizes."""
    e, h, inter = w_gate.shape
    w_down = jnp.swapaxes(w_gate, 1, 2)  # [E, I, H]: the down projection's shape
    rows = []
    cases = [(1, w_gate), (1, w_down), (32, w_gate), (32768, w_gate)]
    for m, w in cases:
        k, n = w.shape[1:]
        if not clock.allow(f"grouped matmul tiles m={m} {k}x{n}", 30):
            continue
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        sizes = np.bincount(np.random.default_rng(m).integers(0, e, m), minlength=e)
        gs = jnp.asarray(sizes.astype(np.int32))
        hit_bytes = int((sizes > 0).sum()) * k * n * 2
        picked = grouped_matmul.pick_config(m, k, n)
        for tiles in _DECODE_TILES if m <= 64 else _PREFILL_TILES:
            cfg = grouped_matmul.GroupedMatmulConfig(**{**dataclasses.asdict(picked), **tiles})
            row = dict(m=m, k=k, n=n, picked=cfg == picked, **dataclasses.asdict(cfg))
            try:
                f = jax.jit(functools.partial(grouped_matmul._mosaic_grouped_matmul, config=cfg))
                # Device time from the profile: at decode sizes a wall-clock time would be
                # mostly the launch of one small jitted call.
                tr = trace_summary(lambda: f(x, w, gs).block_until_ready(), reps=5, top=50)
                t = sum(r["ms"] for r in tr["kernels"] if "mosaic" in r["name"]) / 1e3
                row.update(ms=round(t * 1e3, 4), all_kernels_ms=tr["kernel_ms"],
                           weight_tb_s=round(hit_bytes / t / 1e12, 3))
            except Exception as ex:  # noqa: BLE001
                row["error"] = f"{type(ex).__name__}: {str(ex)[:120]}"
            rows.append(row)
            print("grouped matmul tiles", row, flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [f"# Llama 4 Scout-width slice ({res['layers']} layers): transformers vs jaxattn",
             "", f"{res['device']}; jax {res['jax']}, torch {res.get('torch')}, transformers "
             f"{res.get('transformers')}; attention impl: `{res['attention_impl']}`; copy "
             f"bandwidth {res['copy_tb_s']:.2f} TB/s.", "",
             "| prefill tokens | transformers tok/s | jaxattn tok/s | speed-up |",
             "|---|---|---|---|"]
    for n, r in sorted(res.get("prefill", {}).items(), key=lambda kv: int(kv[0])):
        hf = f"{r['hf_tok_s']:,.0f}" if "hf_tok_s" in r else r.get("hf_error", "-")[:20]
        jx = f"{r['jax_tok_s']:,.0f}" if "jax_tok_s" in r else "-"
        sp = f"{r['jax_tok_s'] / r['hf_tok_s']:.2f}x" if "hf_tok_s" in r and "jax_tok_s" in r else "-"
        lines.append(f"| {n} | {hf} | {jx} | {sp} |")
    lines += ["", f"Decode steps, kv_len {DECODE_CONTEXT}, ms. *engine*: the serving engine's "
              "whole step (async scheduling: the next step is enqueued before this one's tokens "
              "reach the host; *sync*: each step waits for its tokens); *pipelined*: the model "
              "step + greedy sampling driven the same way; *step*: one model step, dispatch to "
              "logits ready. Roofline: weights the batch must read + KV, at the copy bandwidth.",
              "", "| batch | transformers | jaxattn engine | / roofline | engine, sync | "
              "pipelined | step | roofline | GPU kernels (count) | host dispatch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    f2 = lambda r, k: f"{r[k]:.2f}" if k in r else "-"
    for b, r in sorted(res.get("decode", {}).items(), key=lambda kv: int(kv[0])):
        hf = f"{r['hf_ms']:.2f}" if "hf_ms" in r else r.get("hf_error", "-")[:20]
        ratio = (f"**{r['engine_async_ms'] / r['roofline_ms']:.2f}**" if "engine_async_ms" in r
                 else "-")
        ks = (f"{r['jax_trace']['kernel_ms']:.2f} ({r['jax_trace']['kernel_calls']})"
              if r.get("jax_trace") else "-")
        lines.append(f"| {b} | {hf} | {f2(r, 'engine_async_ms')} | {ratio} | "
                     f"{f2(r, 'engine_sync_ms')} | {f2(r, 'jax_pipelined_ms')} | {f2(r, 'jax_ms')} "
                     f"| {r['roofline_ms']:.2f} | {ks} | {f2(r, 'jax_dispatch_ms')} |")
    if res.get("decode_variants"):
        batches = sorted(res["decode"], key=int)
        lines += ["", "| decode step ms, XLA options | " + " | ".join(
            f"batch {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
        rows = {"ours (CUDA graphs incl. kernels)": res["decode"],
                **res["decode_variants"]}
        for name, per in rows.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{per[b]['jax_ms']:.2f}" if "jax_ms" in per.get(b, {}) else "-"
                for b in batches) + " |")
    if res.get("grouped_matmul"):
        lines += ["", "| grouped matmul rows (16 experts, 5120x8192) | experts hit | XLA ragged_dot ms "
                  "| JAX Mosaic example ms | ours ms | dense same-FLOPs ms |",
                  "|---|---|---|---|---|---|"]
        fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "error"
        for r in res["grouped_matmul"]:
            lines.append(f"| {r['m']} | {r['experts_hit']} | {fmt(r, 'xla_ms')} | "
                         f"{fmt(r, 'jax_example_ms')} | {fmt(r, 'ours_ms')} | "
                         f"{r['dense_same_flops_ms']:.3f} |")
    if res.get("skipped"):
        lines += ["", "Skipped (deadline): " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--deadline-s", type=float, default=420)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-micro", action="store_true", help="skip the grouped matmul micro")
    p.add_argument("--no-prefill", action="store_true", help="jaxattn: decode steps only")
    args = p.parse_args(argv)
    clock = Clock(args.deadline_s)
    dev = jax.devices()[0]
    hf_dict = scout_config(args.layers)
    cfg = llama4.Llama4Config.from_hf_dict(hf_dict)
    res = dict(date=datetime.date.today().isoformat(), device=dev.device_kind, jax=jax.__version__,
               layers=args.layers, attention_impl=_kernel_impl("auto", cfg.head_dim, jnp.bfloat16),
               decode_context=DECODE_CONTEXT, page_size=PAGE_SIZE)
    base = os.path.join(RESULTS, f"model-{res['date']}")

    def save():  # after every phase, so a run cut short still leaves its numbers
        res["skipped"] = clock.skipped
        os.makedirs(RESULTS, exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(res, f, indent=2, default=str)
        with open(base + ".md", "w") as f:
            f.write(markdown(res))

    t = time.perf_counter()
    model = llama4.init_random(cfg, seed=0, dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    res["weights_gib"] = sum(x.nbytes for x in jax.tree.leaves(model)) / 2**30
    print(f"random weights {res['weights_gib']:.1f} GiB in {time.perf_counter() - t:.1f}s",
          flush=True)
    # transformers first: JAX's allocator keeps what it has grown to, so JAX work before
    # this would leave torch less room (its 32k prefill runs every expert on every token).
    if not args.no_hf:
        try:
            import torch
            import transformers

            res.update(torch=torch.__version__, transformers=transformers.__version__)
            hf = build_hf(model, hf_dict)
            bench_hf(hf, clock, cfg.vocab_size, res)
            del hf
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 -- report the baseline failure, go on
            res["hf_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("transformers baseline failed:", res["hf_error"], flush=True)
    res["copy_tb_s"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth {res['copy_tb_s']:.2f} TB/s; attention impl {res['attention_impl']}",
          flush=True)
    for b in DECODE_BATCHES:
        r = res.setdefault("decode", {}).setdefault(b, {})
        r.update(decode_bytes(cfg, b, DECODE_CONTEXT))
        r["roofline_ms"] = (r["weight_bytes"] + r["kv_bytes"]) / (res["copy_tb_s"] * 1e12) * 1e3
    save()
    try:
        bench_jax(model, clock, res, save, prefill_lens=() if args.no_prefill else PREFILL_LENS)
    except Exception as e:  # noqa: BLE001 -- e.g. a kernel failing at Scout sizes
        res["jax_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print("jaxattn with impl=auto failed:", res["jax_error"], flush=True)
        if res["attention_impl"] != "reference":
            res["attention_impl"] = "reference (fallback after the error)"
            bench_jax(model, clock, res, save, impl="reference", variants=False)
    save()
    if res["attention_impl"] == "mosaic":
        try:
            bench_engine(model, clock, res)
        except Exception as e:  # noqa: BLE001 -- report, keep the other numbers
            res["engine_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print("engine decode failed:", res["engine_error"], flush=True)
    save()
    if not args.no_micro:  # after the model numbers, which matter more if time runs out
        grouped_matmul_micro(clock, res)
    save()
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
