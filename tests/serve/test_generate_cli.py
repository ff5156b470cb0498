"""``python -m jaxattn.generate``: every line checked before anything compiles, bad lines
reported as FILE:LINE and skipped, ids that survive edits, defaults shared with the server."""

import json

import pytest

from jaxattn.serve import generate
from jaxattn.serve.sampling_params import SamplingParams

GOOD = {"prompt": "Hello", "max_tokens": 3}
LINES = [
    json.dumps(GOOD),
    '{"prompt": "unterminated',
    "[1, 2, 3]",
    json.dumps({"text": "no prompt field"}),
    json.dumps({"prompt": "x", "messages": []}),
    "",
    json.dumps({"prompt_token_ids": [1, "a"]}),
    json.dumps({"id": 7, "prompt": "fine"}),
    json.dumps({"id": 7, "prompt": "same id"}),
    json.dumps({"prompt": "bad temperature", "temperature": -1}),
    json.dumps({"prompt": "bad field type", "max_tokens": "many"}),
    json.dumps(GOOD),  # the same line again: its own id
]


def _write(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _args(inp, out, *flags):
    return generate.build_parser().parse_args(["--input", inp, "--output", out, *flags])


def test_every_line_is_checked_with_file_and_line(tmp_path):
    inp = _write(tmp_path, LINES)
    good, bad = generate.read_lines(inp)
    assert [line.where for line in good] == [f"{inp}:{n}" for n in (1, 8, 10, 11, 12)]
    assert bad[0].startswith(f"{inp}:2: not JSON (") and "column" in bad[0]
    assert bad[1:] == [f"{inp}:3: a line must be a JSON object, got list",
                   f"{inp}:4: needs exactly one of prompt, prompt_token_ids, messages",
                   f"{inp}:5: needs exactly one of prompt, prompt_token_ids, messages (has "
                   "prompt, messages)",
                   f"{inp}:7: prompt_token_ids must be a non-empty list of ints",
                   f"{inp}:9: id 7 already used on line 8"]
    late = generate.resolve_params(good, _args(inp, "out"), {})
    assert late[0].startswith(f"{inp}:10: temperature must be")
    assert late[1].startswith(f"{inp}:11: ")
    assert [line.where for line in good] == [f"{inp}:{n}" for n in (1, 8, 12)]
    assert good[0].id != good[2].id and good[2].id == good[0].id + "-2"


def test_bad_lines_are_reported_before_any_compile(tmp_path, capsys):
    """Only bad lines: reported, exit status 1, and no engine was built (this returns at once)."""
    inp = _write(tmp_path, LINES[1:5])
    assert generate.main(["--input", inp, "--output", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"{inp}:1: not JSON" in err and f"{inp}:2: a line must be a JSON object" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_default_ids_survive_inserted_lines(tmp_path):
    a = [json.dumps({"prompt": f"p{i}"}) for i in range(5)]
    b = a[:2] + [json.dumps({"prompt": "new"})] + a[2:]
    ids_a = [line.id for line in generate.read_lines(_write(tmp_path, a, "a.jsonl"))[0]]
    ids_b = [line.id for line in generate.read_lines(_write(tmp_path, b, "b.jsonl"))[0]]
    assert ids_b[:2] + ids_b[3:] == ids_a
    # Key order does not change a line's id.
    assert generate.content_id({"a": 1, "prompt": "x"}) == generate.content_id({"prompt": "x",
                                                                                "a": 1})


def test_defaults_and_precedence(tmp_path):
    """Line > flag > model's generation_config > SamplingParams (the server's defaults)."""
    inp = _write(tmp_path, [json.dumps({"prompt": "a"}), json.dumps({"prompt": "b",
                                                                      "temperature": 0.5})])
    good, _ = generate.read_lines(inp)
    assert generate.resolve_params(good, _args(inp, "o"), {}) == []
    d = SamplingParams()
    assert (good[0].params.max_tokens, good[0].params.temperature) == (d.max_tokens, d.temperature)
    good, _ = generate.read_lines(inp)
    generate.resolve_params(good, _args(inp, "o"), {"temperature": 0.6, "top_p": 0.9})
    assert (good[0].params.temperature, good[0].params.top_p) == (0.6, 0.9)
    assert good[1].params.temperature == 0.5
    good, _ = generate.read_lines(inp)
    generate.resolve_params(good, _args(inp, "o", "--temperature", "0.1"), {"temperature": 0.6})
    assert [line.params.temperature for line in good] == [0.1, 0.5]
    # Seeds: derived from --seed and the id (not the position); --sampling-seed for all.
    seeds = [line.params.seed for line in good]
    good2, _ = generate.read_lines(inp)
    generate.resolve_params(good2[::-1], _args(inp, "o"), {})
    assert [line.params.seed for line in good2] == seeds and seeds[0] != seeds[1]
    generate.resolve_params(good2, _args(inp, "o", "--seed", "1"), {})
    assert [line.params.seed for line in good2] != seeds
    generate.resolve_params(good2, _args(inp, "o", "--sampling-seed", "5"), {})
    assert [line.params.seed for line in good2] == [5, 5]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 16, as the server)" in out and "else 1.0" in out
    assert "--sampling-seed" in out and "derived from --seed" in out


def test_nonexistent_model_says_so(tmp_path):
    inp = _write(tmp_path, [json.dumps(GOOD)])
    with pytest.raises(SystemExit, match="/nonexistent: the directory does not exist"):
        generate.main(["--model", "/nonexistent", "--input", inp, "--output",
                       str(tmp_path / "o")])


@pytest.mark.slow
def test_good_lines_run_and_bad_ones_are_listed(tmp_path, capsys):
    inp = _write(tmp_path, [json.dumps({"id": "a", "prompt": "Hi", "max_tokens": 2}),
                            "not json",
                            json.dumps({"id": "long", "prompt_token_ids": [5] * 300}),
                            json.dumps({"id": "b", "prompt_token_ids": [5, 6], "max_tokens": 3,
                                        "temperature": 0})])
    out = tmp_path / "o.jsonl"
    code = generate.main(["--input", inp, "--output", str(out), "--max-model-len", "256",
                          "--max-num-seqs", "4", "--max-num-batched-tokens", "32"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{inp}:2: not JSON" in err and f"{inp}:3: This model's maximum context length" in err
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b"} and len(rows["b"]["token_ids"]) == 3
