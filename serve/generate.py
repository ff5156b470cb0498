"""``python -m jaxattn.generate --model DIR --input prompts.jsonl --output out.jsonl``.

Batch generation over a JSONL file. Each input line is an object with one of
``prompt`` (text), ``prompt_token_ids`` or ``messages`` (chat), an optional
``id`` (default: the line number) and optional per-line sampling fields
(``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``,
``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``, ``min_p``,
``min_tokens``, ``logit_bias`` and ``response_format`` as in the HTTP API).
Each output line: ``id``, ``text``, ``token_ids``, ``finish_reason``,
``num_prompt_tokens`` (and ``outputs`` with every choice when ``n > 1``).

Results are appended as they finish, so an interrupted run loses nothing
done: run it again and it skips every id already in the output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jaxattn.serve import cli
from jaxattn.serve.config import initialize_distributed

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                    "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "min_p", "min_tokens", "logit_bias")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxattn.generate",
                                description="Generate completions for a JSONL file of prompts.")
    cli.add_args(p)
    p.add_argument("--input", required=True, help="JSONL: one {\"prompt\": ...} object per line")
    p.add_argument("--output", required=True, help="JSONL results (appended; resumable)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="seed for every line without one")
    return p


def read_done(path: str) -> set:
    """Ids already in the output; a torn last line (killed mid-write) is cut off."""
    done = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial final line: drop it, its prompt runs again
            f.truncate(end)
        for line in data[:end].splitlines():
            if line.strip():
                done.add(json.loads(line)["id"])
    return done


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxattn import parallel
    from jaxattn.serve.sampling_params import SamplingParams

    initialize_distributed(args)  # jax.distributed first, when asked
    with open(args.input, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    import jax

    done = read_done(args.output) if jax.process_index() == 0 and not args.plan_memory else set()
    # Multi-host: all processes run process 0's list (its output file is the one written).
    skip = parallel.agree(np.array([r.get("id", i) in done for i, r in enumerate(rows)], bool))
    todo = [(r.get("id", i), r) for i, r in enumerate(rows) if not skip[i]]
    print(f"jaxattn.generate: {len(rows)} prompts, {len(rows) - len(todo)} already in "
          f"{args.output}, {len(todo)} to run", file=sys.stderr, flush=True)
    if not todo and not args.plan_memory:
        return 0

    from jaxattn.serve.llm import LLM

    llm = LLM(engine=cli.start_engine(args))
    tok = llm.get_tokenizer()
    prompts, params = [], []
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.sampling_seed)
    for rid, r in todo:
        if "messages" in r:
            prompts.append({"prompt_token_ids": tok.encode_chat(r["messages"])})
        elif "prompt_token_ids" in r:
            prompts.append({"prompt_token_ids": r["prompt_token_ids"]})
        elif "prompt" in r:
            prompts.append(r["prompt"])
        else:
            raise SystemExit(f"error: line with id {rid!r} has no prompt, prompt_token_ids or messages")
        fields = {**defaults, **{k: r[k] for k in _SAMPLING_FIELDS if k in r}}
        try:
            if r.get("response_format") is not None:
                from jaxattn.serve.protocol import structured_output_of

                fields["structured_output"] = structured_output_of(r["response_format"])
            params.append(SamplingParams(**fields))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: line with id {rid!r}: {e}")

    # Multi-host (--distributed): every process runs the same engine on the same input (each
    # step is one program over all hosts' devices); process 0 writes the results.
    writer = args.output if jax.process_index() == 0 else os.devnull
    t0, n_in, n_out = time.perf_counter(), 0, 0
    with open(writer, "a", encoding="utf-8") as out:
        try:
            for i, res in llm.iter_generate(prompts, params):
                first = res.outputs[0]
                line = {"id": todo[i][0], "text": first.text, "token_ids": first.token_ids,
                        "finish_reason": first.finish_reason,
                        "num_prompt_tokens": len(res.prompt_token_ids)}
                if len(res.outputs) > 1:
                    line["outputs"] = [{"text": o.text, "token_ids": o.token_ids,
                                        "finish_reason": o.finish_reason} for o in res.outputs]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
                n_in += len(res.prompt_token_ids)
                n_out += sum(len(o.token_ids) for o in res.outputs)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    dt = time.perf_counter() - t0
    print(f"jaxattn.generate: {len(todo)} prompts in {dt:.2f} s: {n_in} prompt tokens, {n_out} "
          f"output tokens, {n_out / dt:.1f} output tok/s, {(n_in + n_out) / dt:.1f} total tok/s",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
