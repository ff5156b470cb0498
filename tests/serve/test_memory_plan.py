"""The memory planner's numbers for Scout, computed independently here, and its verdicts."""

import dataclasses
import functools

import pytest

from jaxattn.serve import plan_memory
from jaxattn.serve import memory_plan as memory
from jaxattn.parallel import ParallelConfig

GiB = 2**30


@pytest.fixture(scope="module")
def scout():
    return memory.named_config("scout")


def _scout_params(tp, ep):
    """Parameters on one device, from Scout's published shapes (not from the spec table)."""
    h, v, layers, e, inter = 5120, 202048, 48, 16, 8192
    n = tp * ep
    attn = (h * 40 * 128 + 2 * h * 8 * 128 + 40 * 128 * h) // n
    experts = (e // ep) * 3 * h * (inter // tp)
    shared = 3 * h * inter // n
    per_layer = attn + experts + shared + e * h + 2 * h  # + router, two norms
    return layers * per_layer + 2 * v * h // n + h  # + embedding, head, final norm


def test_scout_config_fixture_is_scout(scout):
    assert (scout.hidden_size, scout.num_hidden_layers, scout.num_attention_heads,
            scout.num_key_value_heads, scout.num_local_experts, scout.vocab_size) == \
        (5120, 48, 40, 8, 16, 202048)
    assert scout.moe_layers == tuple(range(48)) and scout.attention_chunk_size == 8192
    # ~109B parameters with the vision tower; the text model alone is 107.8B (215.5 GB bf16).
    assert memory.weight_bytes(scout, ParallelConfig()) == 2 * _scout_params(1, 1)
    assert 215e9 < memory.weight_bytes(scout, ParallelConfig()) < 216e9


@pytest.mark.parametrize("tp,ep", [(8, 1), (4, 1), (2, 1), (2, 4), (1, 8), (4, 2)])
def test_weights_per_device_are_the_shards(scout, tp, ep):
    assert memory.weight_bytes(scout, ParallelConfig(tensor=tp, expert=ep)) == \
        2 * _scout_params(tp, ep)


def test_kv_bytes_per_token(scout):
    # K and V, 48 layers, 8 KV heads of 128 dims in bf16, split over the devices.
    assert memory.kv_bytes_per_token(scout, ParallelConfig()) == 2 * 48 * 8 * 128 * 2
    assert memory.kv_bytes_per_token(scout, ParallelConfig(tensor=8)) == 24576
    assert memory.kv_bytes_per_token(scout, ParallelConfig(tensor=2, expert=4)) == 24576


def test_scout_verdicts(scout):
    """TP=8 on H100s fits (25.1 GiB of weights per device, >1M tokens of KV); TP=2 on H100s
    cannot hold the weights; TP=2 on H200s holds a 128k sequence only if XLA may use 90% of
    the GPU; TP=4 on H200s fits; splits that do not divide the KV heads are refused."""
    tp8 = memory.gpu_plan(scout, ParallelConfig(tensor=8), "h100", fraction=0.75)
    assert tp8.fits and round(tp8.weights / GiB, 1) == 25.1
    assert tp8.kv_tokens > 1_000_000 and tp8.full_length_sequences >= 8
    # The hybrid cache: 12 global layers grow with every token (6144 B per token and device
    # at TP=8); the 36 chunked-local ones keep 64 sequences' live chunks plus a step:
    # 64 * (8192 / 16 + 1) + 8192 / 16 = 33344 pages of 16 tokens at 18432 B per token.
    assert tp8.kv_bytes_per_token == 12 * 2 * 128 * 2 and tp8.chunked_need == 33344
    assert tp8.kv_tokens == (tp8.kv_budget - 33344 * 16 * 18432) // (6144 * 16) * 16
    assert tp8.total <= tp8.usable
    bad = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h100", fraction=0.9)
    assert not bad.fits and "of weights per device exceed" in bad.reason
    assert not memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.75).fits
    h200 = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.9)
    assert h200.fits and 131072 <= h200.kv_tokens < 300_000
    assert memory.gpu_plan(scout, ParallelConfig(tensor=4), "h200", fraction=0.75).fits
    odd = memory.gpu_plan(scout, ParallelConfig(tensor=16), "h100")
    assert not odd.fits and "must divide num_key_value_heads=8" in odd.reason


def test_hybrid_pools_split_one_budget(scout):
    """The chunked pool holds min(global pages, what max_num_seqs sequences can hold); at
    TP=2 on H200s (90%) one long sequence leaves ~859k tokens to the global layers, 3.8x the
    non-hybrid 227k (issue 21's >= 850,000), and 64 sequences of 8k-token windows fall back to
    the non-hybrid rate (the chunked pool then needs as many pages as the global one)."""
    h200 = functools.partial(memory.gpu_plan, scout, ParallelConfig(tensor=2), "h200",
                             fraction=0.9, max_num_batched_tokens=8192)
    one = h200(max_num_seqs=1, max_model_len=262144)
    g, c = 12 * 2 * 4 * 128 * 2, 36 * 2 * 4 * 128 * 2
    need = -(-(8192 - 1 + 8192) // 16)  # one sequence: its chunk before a step + the step
    assert (one.kv_bytes_per_token, one.chunked_bytes_per_token, one.chunked_need) == (g, c, need)
    assert one.chunked_pages == need and one.kv_pages == (one.kv_budget - need * 16 * c) // (16 * g)
    # 3 sequences of 262,144 fit the global pool; the chunked one runs max_num_seqs=1.
    assert one.kv_tokens >= 850_000 and one.full_length_sequences == 1
    many = h200(max_num_seqs=64, max_model_len=131072)
    assert many.kv_pages == many.chunked_pages == many.kv_budget // (16 * (g + c))
    assert many.kv_tokens == 227_088
    for pages, chunked in [(many.kv_pages, many.chunked_pages), (one.kv_pages, one.chunked_pages)]:
        assert pages * g * 16 + chunked * c * 16 <= many.kv_budget


def test_models_without_chunked_layers_keep_one_pool():
    p = memory.pool_pages(10_000, 100, 0, 0, global_cap=7)
    assert p == (100, 0)
    assert memory.pool_pages(10_000, 100, 300, 5, global_cap=7) == (85, 5)
    assert memory.pool_pages(10_000, 100, 300, 50, global_cap=7) == (25, 25)


def test_slices_without_global_layers_spend_the_budget_on_live_chunks():
    # Scout's first 2 layers are both chunked-local: global page ids cost nothing, so there
    # are as many as every admitted sequence can use, and the chunked pool is capped by need.
    assert memory.pool_pages(10_000, 0, 300, 5, global_cap=7) == (7, 5)
    assert memory.pool_pages(1_000, 0, 300, 5, global_cap=7) == (7, 3)


def test_kv_budget_leaves_room_for_a_step(scout):
    p = memory.gpu_plan(scout, ParallelConfig(tensor=4), "h100", fraction=0.75)
    free = p.usable - p.weights
    assert p.kv_budget == min(int(0.8 * free), free - p.activations - p.reserve)
    assert memory.activation_bytes(scout, ParallelConfig(tensor=4), num_tokens=16384,
                                   num_seqs=64) > p.activations  # grows with the step


def test_cli(capsys):
    assert plan_memory.main([]) == 0
    table = capsys.readouterr().out
    assert "| TP=8 EP=1 DP=1 | H100 79.6 GiB x 0.90 | 25.1 GiB |" in table
    assert "REFUSED" in table and table.count("fits") >= 10
    assert plan_memory.main(["-tp", "2", "--gpu", "h100"]) == 1
    assert "exceed" in capsys.readouterr().err
    assert plan_memory.main(["-tp", "4", "--gpu", "h200", "--max-model-len", "262144"]) == 0
    assert plan_memory.main(["--config", "nope", "-tp", "2"]) == 2


def _scout_fp8_bytes(tp, ep):
    """FP8 Scout on one device from the published shapes: experts, shared expert at one byte
    plus f32 per-output-channel scales; attention, router, norms, embedding and head bf16."""
    h, v, layers, e, inter = 5120, 202048, 48, 16, 8192
    n = tp * ep
    attn = (h * 40 * 128 + 2 * h * 8 * 128 + 40 * 128 * h) // n
    experts = (e // ep) * 3 * h * (inter // tp)
    expert_scales = (e // ep) * (2 * (inter // tp) + h)  # gate, up: I columns; down: H
    shared = 3 * h * inter // n
    shared_scales = 2 * inter // n + h  # gate/up rows split, down's H outputs replicated
    per_layer = (2 * (attn + e * h + 2 * h) + experts + shared
                 + 4 * (expert_scales + shared_scales))
    return layers * per_layer + 2 * (2 * v * h // n + h)


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (2, 4)])
def test_fp8_weights_per_device(scout, tp, ep):
    assert memory.weight_bytes(scout, ParallelConfig(tensor=tp, expert=ep), "bfloat16", "fp8") == \
        _scout_fp8_bytes(tp, ep)


def test_scout_fp8_on_one_gpu(scout):
    """All of Scout in FP8 (105.2 GiB) on one H200 at XLA's 0.9: fits a 131,072-token sequence
    with max_num_seqs 4 (the chunked pool keeps only the running sequences' live chunks); on
    one H100 the weights alone exceed the GPU, and the refusal says so."""
    one = ParallelConfig()
    h200 = memory.gpu_plan(scout, one, "h200", fraction=0.9, quantization="fp8", max_num_seqs=4)
    assert round(h200.weights / GiB, 1) == 105.2 and h200.fits
    assert h200.kv_tokens >= 131072 and h200.full_length_sequences >= 1
    # 64 sequences' live chunks do not fit beside a 128k sequence: refused, with the remedy.
    wide = memory.gpu_plan(scout, one, "h200", fraction=0.9, quantization="fp8")
    assert not wide.fits and "lower --max-model-len" in wide.reason
    h100 = memory.gpu_plan(scout, one, "h100", fraction=0.9, quantization="fp8")
    assert not h100.fits and "of weights per device exceed" in h100.reason
    assert "105.2 GiB" in h100.reason
    bf16 = memory.gpu_plan(scout, one, "h200", fraction=0.9, max_num_seqs=4)
    assert not bf16.fits and "exceed" in bf16.reason


def test_cli_fp8_one_gpu(capsys):
    assert plan_memory.main(["--quantization", "fp8", "--gpu", "h200", "-tp", "1",
                             "--memory-fraction", "0.9", "--max-num-seqs", "4"]) == 0
    assert "105.2 GiB (fp8)" in capsys.readouterr().out
    assert plan_memory.main(["--quantization", "fp8", "--gpu", "h100", "-tp", "1"]) == 1
    assert plan_memory.main(["--quantization", "fp8"]) == 0
    assert "105.2 GiB fp8" in capsys.readouterr().out


def test_refusal_names_what_would_make_it_fit(scout):
    """A 1M-token sequence on 2xH200 (bf16 cache) misses by a little: at 0.95 of the GPU the
    default budget (0.8 of the free memory) is short but the whole free memory is not, so the
    reason names --kv-cache-memory; at 0.75 neither helps, and it names the plan's own fraction
    (not the process's) in its hint."""
    kw = dict(max_model_len=1 << 20, max_num_seqs=4)
    tight = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.95, **kw)
    assert not tight.fits and "--kv-cache-memory" in tight.reason
    assert "MEM_FRACTION" not in tight.reason
    bigger = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.95,
                             kv_cache_memory=tight.usable - tight.weights - tight.activations
                             - tight.reserve, **kw)
    assert bigger.fits and bigger.full_length_sequences == 1
    low = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.75, **kw)
    assert "--kv-cache-memory" not in low.reason and "now 0.75" in low.reason


def test_plan_of_a_slice_without_global_layers(scout):
    """``benchmarks.multigpu --layers 2`` (layers 0 and 1 are chunked-local) plans and
    describes itself; it divided by the global layers' zero bytes per page."""
    two = dataclasses.replace(scout, num_hidden_layers=2, no_rope_layers=(1, 1))
    p = memory.gpu_plan(two, ParallelConfig(), "h200", fraction=0.9, max_num_seqs=8,
                        max_model_len=131072)
    assert p.fits and p.kv_bytes_per_token == 0 and p.chunked_pages == p.chunked_need
    assert p.kv_pages == 8 * p.pages_per_seq
    assert "KV cache" in memory.describe(p)
