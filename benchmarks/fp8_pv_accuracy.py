"""What an e4m3 P.V (``PrefillConfig.fp8_pv``) would cost in a model's logits, on the CPU.

    python -m benchmarks.fp8_pv_accuracy          # results/fp8-pv-accuracy-<date>.json/.md

The kernel rounds P to e4m3 (at ``prefill.P8_GAIN``) before its P.V wgmma; in interpret mode
its attention output is 10x further from the oracle than the default form's
(tests/kernels/test_fp8_kv.py). Here the reference attention rounds P the same way
(``reference.attend_block``'s ``p_round``) inside the serving step of random Llama 4 models
with Scout's head_dim (128), over an FP8 cache with the engine's fixed scales, and the logits
of a prompt (one prefill step) and of the tokens after it (decode steps, teacher-forced) are
compared with the f32 cache's: mean relative error (|logits - ref| max over the vocabulary,
over ref's largest) and greedy agreement, with and without the rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import kv_quant, reference
from jaxattn.kernels import prefill
from jaxattn.models import llama4
from jaxattn.serve.batch import SeqStep
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.model_runner import Llama4Runner

from benchmarks.common import write_report

PAGE = 32


def round_p_e4m3(p):
    """P as the e4m3 P.V multiplies it: rounded to e4m3 at P8_GAIN, in P's units."""
    gain = prefill.P8_GAIN
    return (p * gain).astype(kv_quant.FP8).astype(jnp.float32) / gain


@contextlib.contextmanager
def p_rounded():
    """The reference attention with P rounded to e4m3 in its P.V (caches cleared around it,
    so jitted callers trace it anew)."""
    original = reference.attend_block
    reference.attend_block = functools.partial(original, p_round=round_p_e4m3)
    jax.clear_caches()
    try:
        yield
    finally:
        reference.attend_block = original
        jax.clear_caches()


def teacher_forced_logits(model, kv_cache_dtype, tokens, prompt_len):
    """Logits after the prompt (one prefill step), then after each next token fed in (one
    decode step each), through the serving step with the reference attention:
    [len(tokens) - prompt_len + 1, vocab] f64."""
    n = len(tokens)
    bucket = max(128, 1 << (prompt_len - 1).bit_length())  # the prompt's step
    config = EngineConfig(max_model_len=max(512, 2 * bucket), max_num_seqs=2,
                          max_num_batched_tokens=bucket, page_size=PAGE, buckets=(16, bucket),
                          attention_impl="reference", kv_cache_dtype=kv_cache_dtype)
    runner = Llama4Runner(model, config, num_pages=64)
    pages = list(range(-(-n // PAGE)))
    out = [runner.forward(runner.build(bucket, [SeqStep(tokens[:prompt_len], 0, pages)]))[0]]
    for i in range(prompt_len, n):
        out.append(runner.forward(runner.build(16, [SeqStep([tokens[i]], i, pages)]))[0])
    return np.asarray(jnp.stack(out), np.float64)


def model_for(seed: int):
    config = llama4.Llama4Config.from_hf_dict(dict(
        vocab_size=512, hidden_size=512, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        num_local_experts=2, interleave_moe_layer_step=2, attention_chunk_size=128,
        initializer_range=0.05))
    return llama4.init_random(config, seed=seed, dtype=jnp.float32)


def compare(logits, ref) -> dict:
    rel = np.abs(logits - ref).max(-1) / np.abs(ref).max(-1)
    return dict(mean_rel_error=float(rel.mean()), max_rel_error=float(rel.max()),
                greedy_agreement=float((logits.argmax(-1) == ref.argmax(-1)).mean()))


def run(seeds=(0, 1, 2), prompt_len=400, new_tokens=24) -> dict:
    rows = []
    for seed in seeds:
        model = model_for(seed)
        tokens = [int(t) for t in np.random.default_rng(seed).integers(0, 512, prompt_len
                                                                        + new_tokens)]
        ref = teacher_forced_logits(model, "auto", tokens, prompt_len)
        fp8 = teacher_forced_logits(model, "fp8", tokens, prompt_len)
        with p_rounded():
            fp8_p8 = teacher_forced_logits(model, "fp8", tokens, prompt_len)
        rows.append(dict(seed=seed, fp8_cache=compare(fp8, ref),
                         fp8_cache_e4m3_p=compare(fp8_p8, ref)))
        print(rows[-1], flush=True)
    return dict(date=datetime.date.today().isoformat(), prompt_len=prompt_len,
                new_tokens=new_tokens, rows=rows)


def markdown(res) -> str:
    lines = [f"# e4m3 P.V, emulated in the reference: logits vs the f32 cache, {res['date']}",
             "", f"Random Llama 4 models (head_dim 128, 4 layers), a {res['prompt_len']}-token "
             f"prompt and {res['new_tokens']} teacher-forced decode steps; mean / max relative "
             "logits error, greedy agreement.", "",
             "| seed | FP8 cache | FP8 cache, P rounded to e4m3 |", "|---|---|---|"]
    cell = lambda c: (f"{c['mean_rel_error']:.4f} / {c['max_rel_error']:.4f} / "
                      f"{c['greedy_agreement']:.3f}")
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {cell(r['fp8_cache'])} | {cell(r['fp8_cache_e4m3_p'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    res = run(tuple(int(s) for s in args.seeds.split(",")))
    write_report(f"fp8-pv-accuracy-{res['date']}" + (f"-{args.tag}" if args.tag else ""), res,
                 markdown(res))


if __name__ == "__main__":
    main()
