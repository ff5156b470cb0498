"""The Mosaic GPU kernels (GPU interpret mode, on the CPU) never read a chunked layer's page
before the live chunk: those table entries point at a NaN page here (the hybrid cache
returns such pages to the pool) and the prefill + decode outputs stay finite and equal
to those over the full table. tests/test_chunked_reads.py is the property version on
the reference and the plan executor."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

import jaxattn

from attention_cases import make_ragged_case

C = 128


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    ipc.reset_gpu_interpret_mode_state()
    yield


def test_kernels_skip_pages_before_the_live_chunk():
    bounds = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=288, max_model_len=640,
                            page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64,
                            chunk_size=C, num_workers=3)
    # Decode rows (1 and 3 tokens) and prefill chunks, all with chunks behind them.
    q_lens, kv_lens = [1, 150, 3, 65], [300, 400, 130, 640]
    case = make_ragged_case(bounds, q_lens, kv_lens, dtype=jnp.bfloat16, seed=7)
    k = np.concatenate([case.k_pages, np.full_like(case.k_pages[:1], np.nan)])
    v = np.concatenate([case.v_pages, np.full_like(case.v_pages[:1], np.nan)])
    table = case.page_table.copy()
    for s, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        table[s, :(kv - q) // C * C // 16] = k.shape[0] - 1
    rest = (case.cu_q_lens, case.kv_lens, np.int32(case.num_seqs))
    run = lambda k, v, t: np.asarray(jaxattn.ragged_paged_attention(
        case.q, k, v, t, *rest, bounds=bounds, chunk_size=C, impl="interpret"), np.float32)
    clean = run(np.concatenate([case.k_pages, case.k_pages[:1]]),
                np.concatenate([case.v_pages, case.v_pages[:1]]), case.page_table)
    got = run(k, v, table)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, clean)
