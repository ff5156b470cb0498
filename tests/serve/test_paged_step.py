"""The serving forward (chunked prefill + decode over the paged cache) against transformers.

A small engine loop drives ``paged_step.make_step_fn`` the way the runner does: each step
packs decode tokens first, then prefill chunks up to the token budget, into a
StepBatch of one of two bucket sizes; pages are handed out shuffled so the page
table matters. Every step's logits (last new token of each sequence) are
compared with transformers' full-sequence logits at the same positions.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxattn.models import llama4
from jaxattn.serve import kv_cache as cache
from jaxattn.serve import paged_step
from jaxattn.serve.batch import SeqStep, build_step
from jaxattn.serve.config import EngineConfig

from llama4_fixtures import CONFIG_NAMES, checkpoint, expected, max_err

TOL = 1e-4
PAGE_SIZE, NUM_PAGES, BUDGET, DECODE_BUCKET = 8, 64, 64, 8


@dataclasses.dataclass
class Seq:
    tokens: list  # known tokens (the prompt; greedy ones are appended as produced)
    prefill: int  # tokens fed as prefill chunks; the rest go one per step
    stop: int  # stop after computing position stop - 1
    want: np.ndarray  # HF logits per position [positions, V]
    pages: list
    greedy: bool = False
    done: int = 0  # tokens in the cache


def _bounds(config):
    return EngineConfig(max_num_seqs=4, max_num_batched_tokens=BUDGET, max_model_len=256,
                        page_size=PAGE_SIZE).bounds(config)


def _sequences(e, rng):
    pages = list(rng.permutation(NUM_PAGES))
    take = lambda n: [int(pages.pop()) for _ in range(-(-n // PAGE_SIZE))]
    ids, logits = e["input_ids"], e["logits"]
    prompt, greedy = e["prompt"], e["greedy_tokens"]
    return [
        Seq(list(ids[0]), prefill=100, stop=ids.shape[1], want=logits[0], pages=take(150)),
        Seq(list(ids[1]), prefill=90, stop=ids.shape[1], want=logits[1], pages=take(150)),
        # Greedy: positions 0..P+30 are computed; the logits at P+30 give the 32nd token.
        Seq(list(prompt), prefill=len(prompt), stop=len(prompt) + len(greedy) - 1,
            want=e["greedy_logits"], pages=take(len(prompt) + len(greedy)), greedy=True),
    ]


def _run(model, seqs, *, impl="reference", max_steps=None, **step_options):
    """Drive the engine loop; returns (per-step max logit error, step fn, logits per step,
    (step size, address of each output) per step)."""
    bounds = _bounds(model.config)
    step = paged_step.make_step_fn(model, bounds, impl=impl, **step_options)
    spec = paged_step.cache_spec(model.config, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                             dtype=model.dtype)
    kv = cache.allocate(spec)
    errs, outs, addresses = [], [], []
    while any(s.done < s.stop for s in seqs) and (max_steps is None or len(outs) < max_steps):
        live = [s for s in seqs if s.done < s.stop]
        decode = [s for s in live if s.done >= s.prefill]
        sched, budget = [(s, 1) for s in decode], BUDGET - len(decode)
        for s in live:
            if s.done < s.prefill and budget > 0:
                n = min(s.prefill - s.done, budget)
                sched.append((s, n))
                budget -= n
        num_tokens = BUDGET if any(n > 1 for _, n in sched) else DECODE_BUCKET
        batch = build_step(bounds, num_tokens, [
            SeqStep(s.tokens[s.done:s.done + n], s.done, s.pages) for s, n in sched],
            num_pages=NUM_PAGES)
        *out, kv = step(kv, batch)
        addresses.append((num_tokens, tuple(x.unsafe_buffer_pointer() for x in out)))
        # Read a device copy: a host view of the logits would keep their buffer from being
        # donated to the next step (JAX would then copy, at a new address).
        logits = np.asarray(jax.numpy.copy(out[0]))
        outs.append(logits)
        for i, (s, n) in enumerate(sched):
            s.done += n
            errs.append(max_err(logits[i], s.want[s.done - 1]))
            if s.greedy and s.done >= s.prefill and s.done == len(s.tokens):
                s.tokens.append(int(np.argmax(logits[i])))
    return errs, step, outs, addresses


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_paged_serving_matches_transformers(name):
    e = expected(name)
    model = llama4.load(checkpoint(name))
    seqs = _sequences(e, np.random.default_rng(0))
    errs, step, _, _ = _run(model, seqs)
    print(f"{name}: {len(errs)} logit rows, max |error| vs transformers = {max(errs):.2e}")
    assert max(errs) < TOL
    greedy = seqs[2]
    np.testing.assert_array_equal(greedy.tokens[len(e["prompt"]):], e["greedy_tokens"])
    # Two token-count buckets were used; every other mix of lengths reused their compiles.
    assert step.jitted._cache_size() == 2


def test_reused_outputs_stay_at_one_address():
    """``reuse_outputs`` (the runner's setting): every step of one size writes its logits
    and hidden states where the previous one did (the step's CUDA graphs record addresses),
    and the logits are those of the step without it."""
    e = expected("moe_dense")
    model = llama4.load(checkpoint("moe_dense"))
    runs = [_run(model, _sequences(e, np.random.default_rng(2)), return_hidden=True,
                 reuse_outputs=reuse) for reuse in (False, True)]
    for want, got in zip(runs[0][2], runs[1][2]):
        np.testing.assert_array_equal(got, want)
    for reuse, (*_, addresses) in zip((False, True), runs):
        sizes = [t for t, _ in addresses]
        assert len(set(sizes)) == 2 and all(sizes.count(t) > 1 for t in sizes)
        logits = {a[0] for _, a in addresses}
        hidden = {t: {a[1] for s, a in addresses if s == t} for t in sizes}
        if reuse:
            assert len(logits) == 1 and all(len(h) == 1 for h in hidden.values())
        else:  # the check can fail: without reuse every output is a new allocation
            assert len(logits) > 1


def test_executor_plans_match_reference():
    """impl='executor' walks the planner's plans (the kernels' input) that the step builds
    once per layer kind; it must give the reference's logits."""
    e = expected("moe_dense")
    model = llama4.load(checkpoint("moe_dense"))
    ref = _run(model, _sequences(e, np.random.default_rng(1)), max_steps=4)[2]
    got = _run(model, _sequences(e, np.random.default_rng(1)), impl="executor", max_steps=4)[2]
    for a, b in zip(ref, got):
        assert max_err(a, b) < 1e-5


def test_bounds_and_cache_spec_follow_config():
    config = llama4.Llama4Config.from_pretrained(checkpoint("moe_dense"))
    b = _bounds(config)
    assert (b.num_q_heads, b.num_kv_heads, b.head_dim, b.chunk_size) == (4, 2, 16, 32)
    assert b.chunk_size % b.block_kv == 0 and b.block_kv % PAGE_SIZE == 0
    spec = paged_step.cache_spec(config, num_pages=10, page_size=PAGE_SIZE, dtype="bfloat16")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (4, 2, 16, "bfloat16")
