"""``python -m jaxattn.generate --model DIR --input prompts.jsonl --output out.jsonl``.

Batch generation over a JSONL file. Each input line is an object with one of
``prompt`` (text), ``prompt_token_ids`` or ``messages`` (chat), an optional
``id`` and optional per-line sampling fields (:data:`SAMPLING_FIELDS`: ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``, ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty``, ``min_p``, ``min_tokens``, ``logit_bias``, and
``response_format`` as in the HTTP API).
Each output line: ``id``, ``text``, ``token_ids``, ``finish_reason``,
``num_prompt_tokens`` (and ``outputs`` with every choice when ``n > 1``).

A line without an ``id`` gets one made from its content (a hash of the line's JSON, plus
``-2``, ``-3``... for repeats of the same line), so inserting or removing other lines changes
no id. Results are appended as they finish, so an interrupted run loses nothing done: run it
again and it skips every id already in the output file.

Every line is checked before the model is loaded and compiled: a bad line (not JSON, not an
object, no prompt, a bad sampling field, a prompt too long) is reported as
``FILE:LINE: problem``, the good lines run and are written, and the exit status is 1.

Sampling defaults, highest first: the line's field, the flag (``--temperature`` ...), the
model's ``generation_config.json``, SamplingParams' default (the server's too).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np

from jaxattn.serve import cli
from jaxattn.serve.config import initialize_distributed

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                   "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p", "min_tokens", "logit_bias")
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
_EPILOG = """\
seeds: --seed seeds the engine: a line without its own "seed" (and no --sampling-seed) samples
with a seed derived from --seed and the line's id, so its output depends neither on its place
in the file nor on resuming. --sampling-seed gives every line without a "seed" that one seed
(on the random-weight default model, same-seed lines then produce nearly the same text).
"""


def build_parser() -> argparse.ArgumentParser:
    from jaxattn.serve.sampling_params import SamplingParams

    d = SamplingParams()
    p = argparse.ArgumentParser(prog="python -m jaxattn.generate",
                                description="Generate completions for a JSONL file of prompts.",
                                epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_args(p)
    g = p.add_argument_group("input, output and sampling (a line's own fields win)")
    g.add_argument("--input", required=True, help="JSONL: one {\"prompt\": ...} object per line")
    g.add_argument("--output", required=True, help="JSONL results (appended; resumable)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate per line (default: {d.max_tokens}, as the server)")
    model_default = "default: the model's generation_config.json, else"
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 is greedy ({model_default} {d.temperature})")
    g.add_argument("--top-p", type=float, default=None, help=f"({model_default} {d.top_p})")
    g.add_argument("--top-k", type=int, default=None, help=f"0: off ({model_default} off)")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="the seed of every line without one (default: derived from --seed and "
                   "the line's id)")
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


@dataclasses.dataclass
class Line:
    where: str  # "FILE:LINE"
    id: object
    row: dict
    params: object = None  # SamplingParams once resolved
    prompt: object = None  # what LLM.generate takes


def content_id(row: dict) -> str:
    """The default id of a line: a hash of its canonical JSON (key order does not matter)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_lines(path: str) -> tuple[list[Line], list[str]]:
    """Every non-blank line of ``path`` checked for form (JSON object, one prompt field of the
    right type, a hashable id given once): (good lines, ``FILE:LINE: problem`` for the rest)."""
    good, bad = [], []
    seen_ids: dict = {}
    repeats: collections.Counter = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            problem = None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append(f"{where}: not JSON ({e.msg}: column {e.colno})")
                continue
            if not isinstance(row, dict):
                bad.append(f"{where}: a line must be a JSON object, got {type(row).__name__}")
                continue
            problem = _prompt_problem(row)
            if "id" in row and not isinstance(row["id"], (str, int)) or isinstance(
                    row.get("id"), bool):
                problem = problem or f"id must be a string or an int, got {row['id']!r}"
            if problem:
                bad.append(f"{where}: {problem}")
                continue
            if "id" in row:
                rid = row["id"]
            else:
                key = content_id(row)
                repeats[key] += 1
                rid = key if repeats[key] == 1 else f"{key}-{repeats[key]}"
            if rid in seen_ids:
                bad.append(f"{where}: id {rid!r} already used on line {seen_ids[rid]}")
                continue
            seen_ids[rid] = n
            good.append(Line(where, rid, row))
    return good, bad


def _prompt_problem(row: dict) -> str | None:
    given = [k for k in PROMPT_FIELDS if k in row]
    if len(given) != 1:
        return (f"needs exactly one of {', '.join(PROMPT_FIELDS)}"
                + (f" (has {', '.join(given)})" if given else ""))
    value = row[given[0]]
    if given[0] == "prompt" and not (isinstance(value, str) and value):
        return "prompt must be a non-empty string"
    if given[0] == "prompt_token_ids" and not (
            isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return "prompt_token_ids must be a non-empty list of ints"
    if given[0] == "messages" and not (
            isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return "messages must be a non-empty list of {\"role\", \"content\"} objects"
    return None


def resolve_params(lines: list[Line], args, model_defaults: dict) -> list[str]:
    """Each line's SamplingParams (line > flag > model > SamplingParams); the bad ones'
    problems (and those lines taken out of ``lines``)."""
    import random

    from jaxattn.serve.sampling_params import SamplingParams

    flags = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k,
                                   seed=args.sampling_seed).items() if v is not None}
    bad, keep = [], []
    for line in lines:
        fields = {**model_defaults, **flags, **{k: line.row[k] for k in SAMPLING_FIELDS
                                                 if k in line.row}}
        if fields.get("seed") is None:  # derived from the engine seed and the id: resumable
            fields["seed"] = random.Random(f"{args.seed}/{line.id!r}").getrandbits(63)
        try:
            if line.row.get("response_format") is not None:
                from jaxattn.serve.protocol import structured_output_of

                fields["structured_output"] = structured_output_of(line.row["response_format"])
            line.params = SamplingParams(**fields)
        except (TypeError, ValueError) as e:
            bad.append(f"{line.where}: {e}")
            continue
        keep.append(line)
    lines[:] = keep
    return bad


def encode_prompts(lines: list[Line], llm) -> list[str]:
    """Each line's prompt in the form LLM.generate takes, checked against the engine's limits;
    the bad ones' problems (and those lines taken out of ``lines``)."""
    tok, engine = llm.get_tokenizer(), llm.engine
    bad, keep = [], []
    for line in lines:
        r = line.row
        try:
            if "messages" in r:
                ids = tok.encode_chat(r["messages"])
            elif "prompt_token_ids" in r:
                ids = list(r["prompt_token_ids"])
            else:
                ids = tok.encode(r["prompt"])
            engine.validate(ids, line.params)
        except (ValueError, TypeError, KeyError) as e:
            bad.append(f"{line.where}: {e}")
            continue
        line.prompt = {"prompt_token_ids": ids}
        keep.append(line)
    lines[:] = keep
    return bad


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxattn import parallel

    initialize_distributed(args)  # jax.distributed first, when asked
    from jaxattn.serve.engine import check_model_dir

    try:
        check_model_dir(args.model)
        lines, bad = read_lines(args.input)
    except OSError as e:  # FileNotFoundError included
        raise SystemExit(f"error: {e}")
    import jax

    done = read_done(args.output) if jax.process_index() == 0 and not args.plan_memory else set()
    # Multi-host: all processes run process 0's list (its output file is the one written).
    skip = parallel.agree(np.array([line.id in done for line in lines], bool))
    todo = [line for line, s in zip(lines, skip) if not s]
    print(f"jaxattn.generate: {len(lines) + len(bad)} prompts, {len(lines) - len(todo)} already "
          f"in {args.output}, {len(todo)} to run" + (f", {len(bad)} bad" if bad else ""),
          file=sys.stderr, flush=True)
    from jaxattn.serve.generation_config import sampling_defaults

    try:
        bad += resolve_params(todo, args, sampling_defaults(args.model))
    except (ValueError, OSError) as e:  # an unreadable generation_config.json
        raise SystemExit(f"error: {e}")
    _report(bad)  # before the (long) start-up: the user can fix the file meanwhile
    if not todo and not args.plan_memory:
        return 1 if bad else 0

    from jaxattn.serve.llm import LLM

    llm = LLM(engine=cli.start_engine(args))
    late = encode_prompts(todo, llm)
    _report(late)
    bad += late

    # Multi-host (--distributed): every process runs the same engine on the same input (each
    # step is one program over all hosts' devices); process 0 writes the results.
    writer = args.output if jax.process_index() == 0 else os.devnull
    t0, n_in, n_out = time.perf_counter(), 0, 0
    with open(writer, "a", encoding="utf-8") as out:
        try:
            for i, res in llm.iter_generate([line.prompt for line in todo],
                                            [line.params for line in todo]):
                first = res.outputs[0]
                line = {"id": todo[i].id, "text": first.text, "token_ids": first.token_ids,
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
    if bad:
        print(f"jaxattn.generate: {len(bad)} bad lines not run (listed above)", file=sys.stderr)
    return 1 if bad else 0


def _report(problems: list[str]) -> None:
    for p in problems:
        print(p, file=sys.stderr)
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
