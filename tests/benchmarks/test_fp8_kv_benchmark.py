"""benchmarks.fp8_kv's pools: shuffled, or a sequence's pages one after another (the
engine's order, which the prefill copies a tile at a time); both hold the same tokens."""

import numpy as np
import pytest

from benchmarks import fp8_kv


@pytest.mark.parametrize("in_order", [False, True])
def test_pools_hold_each_sequence_in_table_order(in_order):
    (k, _), (k8, _, ks, _), table = fp8_kv._cache(2, 3 * fp8_kv.PAGE, in_order=in_order)
    table = np.asarray(table)
    assert sorted(table.ravel()) == list(range(6))
    assert (table.ravel() == np.arange(6)).all() == in_order
    shuffled = fp8_kv._cache(2, 3 * fp8_kv.PAGE, in_order=not in_order)
    # the same draw of pages either way; only where each sequence's pages sit differs
    np.testing.assert_array_equal(np.asarray(k), np.asarray(shuffled[0][0]))
    assert k8.shape == k.shape and ks.shape == (6, fp8_kv.HKV, fp8_kv.PAGE)
