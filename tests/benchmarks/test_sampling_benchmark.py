"""benchmarks/sampling.py: its sort-based anchor computes what the sampler's threshold
search does, and a run (CPU: wall clock) writes a row per call and batch size."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import common, sampling as bench  # noqa: E402
from jaxattn.serve.sampling import filter_mask  # noqa: E402


@pytest.mark.parametrize("impl", ["sort_filter_mask", "bins_filter_mask"])
def test_the_other_masks_keep_what_the_threshold_search_keeps(impl):
    rng = np.random.default_rng(0)
    x = rng.permutation(5000).reshape(4, 1250).astype(np.float32) / 300
    x[2, ::3] = -np.inf  # as min_p or a grammar leaves them
    top_k = np.array([0, 40, 0, 7], np.int32)
    top_p = np.array([1.0, 1.0, 0.83, 0.5], np.float32)
    got = np.asarray(getattr(bench, impl)(x, top_k, top_p))
    np.testing.assert_array_equal(got & np.isfinite(x),
                                  np.asarray(filter_mask(x, top_k, top_p)) & np.isfinite(x))
    assert got[1].sum() == 40 and got[0].all()


def test_a_run_writes_both_calls_per_batch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(bench, "VOCAB", 4096)
    assert bench.main(["--rounds", "1", "--reps", "1", "--rows", "1,3"]) == 0
    (path,) = tmp_path.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [(r["rows"], r["call"].split()[0]) for r in rows] == [
        (1, "top-p"), (1, "top-20"), (3, "top-p"), (3, "top-20")]
    assert [len(r["us"]) for r in rows] == [4, 2, 4, 2]
    for r in rows:
        assert set(r["us"]) == set(r["kernels"]) and "jaxattn" in r["us"]
        assert all(t > 0 for t in r["us"].values())
    assert "top-p 0.9 mask" in capsys.readouterr().out
