"""benchmarks.hlo_dump: a profile's XLA kernel names back to the source lines they fused."""

import os
import subprocess
import sys
import textwrap

from benchmarks import hlo_dump

SOURCE = textwrap.dedent("""\
    import jax
    import jax.numpy as jnp


    def inner(x):
        return jnp.exp(x) * 3.0


    def middle(x):
        return inner(x) + 1.0


    @jax.jit
    def step(x):
        return jnp.sum(middle(x) * 2, -1), jnp.tanh(x)


    @jax.jit
    def other(x):
        return jnp.cos(x)


    print(step(jnp.ones((16, 512))), other(jnp.ones(3)))
    """)


def _dump(tmp_path, module=None):
    (tmp_path / "prog.py").write_text(SOURCE)
    out = tmp_path / "dump"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": hlo_dump.dump_flags(str(out), module)}
    subprocess.run([sys.executable, "prog.py"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    return out


def test_kernel_names_are_hlo_names_with_underscores():
    assert hlo_dump.kernel_name("loop_add_fusion.3") == "loop_add_fusion_3"
    assert hlo_dump.kernel_name("input_reduce_fusion") == "input_reduce_fusion"


def test_fusions_map_to_the_lines_and_callers_they_were_fused_from(tmp_path, monkeypatch):
    out = _dump(tmp_path, "jit_step")
    names = {f.split(".")[1] for f in os.listdir(out) if f.endswith("after_optimizations.txt")}
    assert names == {"jit_step"}  # the module filter: `other` is not dumped
    text = next(open(out / f).read() for f in os.listdir(out)
                if f.endswith("after_optimizations.txt"))
    fusions = [hlo_dump.kernel_name(line.split(" = ")[0].strip().lstrip("%"))
               for line in text.splitlines() if " fusion(" in line]
    assert fusions
    monkeypatch.chdir(tmp_path)  # frames are shown relative to the working directory
    found = hlo_dump.fusion_sources(str(out), fusions + ["not_a_kernel"], module="jit_step")
    assert set(found) == set(fusions)
    frames = {f for info in found.values() for _, fr in info["ops"] for f in fr}
    # The exp and its multiply by 3 fused somewhere, found with inner's line and its caller's.
    assert "prog.py:6 (inner)" in frames and "prog.py:10 (middle)" in frames
    ops = {op.split("/")[-1] for info in found.values() for op, _ in info["ops"]}
    assert {"exp", "tanh"} <= ops
    assert hlo_dump.fusion_sources(str(out), fusions, module="jit_other") == {}
