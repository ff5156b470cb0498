"""benchmarks/multigpu.py --dry-run: the issue-9 script end to end on 8 simulated devices."""

import json
import os

import pytest

from benchmarks import multigpu


@pytest.mark.slow
def test_dry_run_serves_every_length_alone_and_mixed(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert multigpu.main(["--dry-run", "--decode-tokens", "4", "--out", str(tmp_path)]) == 0
    (name,) = os.listdir(tmp_path)
    with open(tmp_path / name) as f:
        res = json.load(f)
    assert res["mesh"] == "TP=8 EP=1 DP=1" and res["num_devices"] == 8
    assert res["all_completed"] and res["compiles_after_warmup"] == 0
    assert set(res["alone"]) == set(res["mixed"]["requests"]) == {str(n) for n in
                                                                  multigpu.DRY_LENGTHS}
    for r in list(res["alone"].values()) + list(res["mixed"]["requests"].values()):
        assert r["output_tokens"] == 4 and r["ttft_s"] > 0 and r["prefill_tok_s"] > 0
    for r in res["alone"].values():  # per row: decode against its roofline, prefill MFU
        assert r["decode_ms_per_step"] > 0 and r["roofline_ms"] > 0 and 0 < r["mfu"] < 1
    # What else is in the batch does not change a sequence's logprobs (beyond bf16 noise).
    assert res["mixed_matches_alone"]
    assert all(c["steps"] >= 1 for c in res["mixed_vs_alone"].values())
    # Batch decode throughput at the dry run's context, against its roofline.
    assert [r["batch"] for r in res["batch_decode"]] == [1, 4]
    for r in res["batch_decode"]:
        assert r["all_completed"] and r["ms_per_step"] > 0 and r["ratio_to_roofline"] > 0
        assert 0 <= r["device_wait_ms_per_step"] <= r["ms_per_step"]
    assert res["read_bytes_s"] > 0


@pytest.mark.parametrize("split", [["-tp", "1", "--kv-cache-dtype", "fp8", "--max-model-len",
                                    "1000", "--no-route-in-norm", "--no-static-o-scale",
                                    "--decode-batches", "1", "--temperature", "0.6",
                                    "--top-p", "0.9"],
                                   ["-tp", "2", "-ep", "4", "--fp8-attention"]])
def test_dry_run_fp8(tmp_path, monkeypatch, split):
    """--quantization fp8: FP8 experts and MLPs drawn per parameter and quantised on the
    devices; one device (all of Scout on one H200, with the FP8 KV cache issue 21's
    1M-token run uses) and expert x tensor parallel (the attention projections FP8 too; the
    bf16 model on such a mesh: tests/sharded/test_sharded_serving.py), with the model's
    decode defaults (the routing in the norm's kernel, the attention output under a static
    scale) and without; the first with a batch decode sampled as Scout's defaults ask."""
    import importlib

    monkeypatch.delenv("OUT", raising=False)
    for switch in multigpu.SWITCHES:  # the script sets them
        module = importlib.import_module(switch.module)
        monkeypatch.setattr(module, switch.name, getattr(module, switch.name))
    assert multigpu.main(["--dry-run", "--quantization", "fp8", "--skip-alone",
                          "--decode-tokens", "2", "--lengths", "64,79,200",
                          "--decode-batches", "", "--out", str(tmp_path), *split]) == 0
    (name,) = os.listdir(tmp_path)
    attn = "--fp8-attention" in split
    assert ("fp8-attn" in name) is attn and "fp8" in name
    with open(tmp_path / name) as f:
        res = json.load(f)
    assert res["quantization"] == "fp8" and res["fp8_attention"] is attn and res["all_completed"]
    assert res["compiles_after_warmup"] == 0 and len(res["mixed"]["requests"]) == 3
    assert (res["kv_cache_dtype"] == "fp8") is ("--kv-cache-dtype" in split)
    # --max-model-len raises the engine's bound (to a page multiple) past what the run needs
    assert (res["max_model_len"] == 1024) is ("--max-model-len" in split)
    assert res["route_in_norm"] is ("--no-route-in-norm" not in split)
    assert res["static_o_scale"] is ("--no-static-o-scale" not in split)
    sampled = "--top-p" in split
    assert res["batch_decode_sampling"]["top_p"] == (0.9 if sampled else 1.0)
    assert [r["batch"] for r in res["batch_decode"]] == ([1] if sampled else [])
    assert all(r["all_completed"] for r in res["batch_decode"])


def test_gpu_environment_keeps_the_default_allocator(monkeypatch):
    """On GPUs the script lets XLA use 90% of memory and, like the engine, leaves the allocator
    to XLA's default (serve/allocator.py); a user's own settings win."""
    for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.setenv(name, "")  # so that teardown restores the variable as it was,
        monkeypatch.delenv(name)  # also what the function sets behind monkeypatch's back
    multigpu._setup_environment(dry_run=False)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    assert "XLA_PYTHON_CLIENT_ALLOCATOR" not in os.environ
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    multigpu._setup_environment(dry_run=False)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
