"""benchmarks/sampling.py: its sort-based anchor computes what the sampler's threshold
search does, and a run (CPU: wall clock) writes a row per call and batch size."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import common, sampling as bench  # noqa: E402
from jaxattn.serve.sampling import filter_mask  # noqa: E402


def test_the_sort_anchor_keeps_what_the_threshold_search_keeps():
    x = np.random.default_rng(0).permutation(5000).reshape(4, 1250).astype(np.float32) / 300
    top_k = np.array([0, 40, 0, 7], np.int32)
    top_p = np.array([1.0, 1.0, 0.83, 0.5], np.float32)
    np.testing.assert_array_equal(np.asarray(bench.sort_filter_mask(x, top_k, top_p)),
                                  np.asarray(filter_mask(x, top_k, top_p)))


def test_a_run_writes_both_calls_per_batch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(bench, "VOCAB", 4096)
    assert bench.main(["--rounds", "1", "--reps", "1", "--rows", "1,3"]) == 0
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [(r["rows"], r["call"].split()[0]) for r in rows] == [
        (1, "top-p"), (1, "top-20"), (3, "top-p"), (3, "top-20")]
    for r in rows:
        assert set(r["us"]) == set(r["kernels"]) and len(r["us"]) == 2
        assert all(t > 0 for t in r["us"].values())
    assert "top-p 0.9 mask" in capsys.readouterr().out
