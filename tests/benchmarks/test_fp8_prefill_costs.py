"""benchmarks.fp8_prefill_costs: each column's swap reaches the kernel it times (CUDA
lowering on the CPU: a swap that no longer matched a helper the kernel calls would time the
full FP8 form under another name), and the helpers come back afterwards."""

import jax

from benchmarks import fp8_prefill_costs as costs
from jaxattn.kernels import common


def test_every_column_lowers_to_its_own_kernel_and_the_helpers_come_back():
    originals = {n: getattr(common, n) for n in costs._HELPERS}
    modules = {}
    for name, (f, args) in costs.columns("causal", 256).items():
        with costs._swapped(costs.COLUMNS[name][1]):
            text = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
        assert "mosaic_gpu" in text, name
        modules[name] = text
        assert {n: getattr(common, n) for n in costs._HELPERS} == originals
    assert len(set(modules.values())) == len(modules)  # every swap changed the kernel


def test_table_has_a_line_per_case_and_a_cell_per_column():
    row = dict(mode="causal", length=8192, **{f"{n}_{k}": 1.0 for n in costs.COLUMNS
                                              for k in ("ms", "tflops", "over_bf16")})
    md = costs.markdown(dict(device="H200", jax="0.11.2", date="d", rows=[row, row]))
    lines = [line for line in md.splitlines() if line.startswith("| causal")]
    assert len(lines) == 2 and all(line.count("|") == len(costs.COLUMNS) + 2 for line in lines)
