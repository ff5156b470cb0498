"""The memory planner's numbers for Scout, computed independently here, and its verdicts."""

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
    assert tp8.kv_tokens == tp8.kv_budget // (24576 * 16) * 16
    assert tp8.total <= tp8.usable
    bad = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h100", fraction=0.9)
    assert not bad.fits and "of weights per device exceed" in bad.reason
    assert not memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.75).fits
    h200 = memory.gpu_plan(scout, ParallelConfig(tensor=2), "h200", fraction=0.9)
    assert h200.fits and 131072 <= h200.kv_tokens < 300_000
    assert memory.gpu_plan(scout, ParallelConfig(tensor=4), "h200", fraction=0.75).fits
    odd = memory.gpu_plan(scout, ParallelConfig(tensor=16), "h100")
    assert not odd.fits and "must divide num_key_value_heads=8" in odd.reason


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
