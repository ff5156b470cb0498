"""The kernels of a compiled step in launch order, each with the source line it comes from.

    XLA_FLAGS="--xla_dump_to=/tmp/d --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*jitted.*" \\
        python3 -m benchmarks.multigpu --quantization fp8 --layers 4 ...
    python -m benchmarks.step_kernels /tmp/d/module_*.jit_jitted.*after_optimizations.txt

A profile names a step's small kernels after XLA's fusions (``input_reduce_fusion_17``),
which say nothing of the model code behind them. XLA's optimised module lists them in
launch order with the stack of the JAX operation each came from; this prints one line per
fusion or custom call of the entry computation: name, shape, kind (or custom-call target),
op name and the innermost model frames. That is how the per-layer decode kernels of
benchmarks/NOTES-fp8.md's "Fewer kernels per layer" were found (a 4-layer slice: the module
of 48 layers repeats the same per-layer sequence).
"""

from __future__ import annotations

import argparse
import re
import sys

# Frames of the drivers, not the model: left out of the printed stacks.
_DRIVER_FILES = {"<frozen runpy>", "multigpu.py", "engine.py", "model_runner.py",
                 "paged_step.py", "traceback_util.py", "api.py", "pjit.py", "linear_util.py",
                 "module.py", "graph.py", "object.py", "transforms.py", "core.py"}
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_KERNEL = re.compile(r"\s*(?:ROOT )?%([\w.\-#]+) = (.*?) (fusion|custom-call)\(")


def _stack_tables(lines):
    """The module's source tables: a function from a stack frame id to 'file:line:function'
    entries, innermost first."""
    tables = {name: {} for name in _TABLES}
    current = None
    for line in lines:
        if line in _TABLES:
            current = tables[line]
            continue
        m = re.match(r"(\d+) (.*)", line)
        if current is None or not m:
            current = None if line.startswith(("ENTRY", "%", "HloModule")) else current
            continue
        current[int(m.group(1))] = m.group(2)
    files = {i: v.strip('"').split("/")[-1] for i, v in tables["FileNames"].items()}
    funcs = {i: v.strip('"') for i, v in tables["FunctionNames"].items()}
    fields = lambda v: {k: int(x) for k, x in re.findall(r"(\w+)=(\d+)", v)}
    locs = {i: fields(v) for i, v in tables["FileLocations"].items()}
    frames = {i: fields(v) for i, v in tables["StackFrames"].items()}

    def stack(frame: int) -> list[str]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc = locs[frames[frame]["file_location_id"]]
            name = files.get(loc["file_name_id"], "?")
            if name not in _DRIVER_FILES:
                out.append(f"{name}:{loc['line']}:{funcs.get(loc['function_name_id'], '?')}")
            frame = frames[frame].get("parent_frame_id", 0)
        return out

    return stack


def kernels(text: str) -> list[dict]:
    """The entry computation's fusions and custom calls, in order."""
    lines = text.splitlines()
    stack = _stack_tables(lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        m = _KERNEL.match(line)
        if not m:
            continue
        kind = (re.search(r'custom_call_target="([^"]+)"', line)
                or re.search(r"kind=(\w+)", line))
        op = re.search(r'op_name="([^"]+)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        out.append({"name": m.group(1), "shape": m.group(2),
                    "kind": kind.group(1) if kind else m.group(3),
                    "op": op.group(1) if op else "",
                    "source": stack(int(frame.group(1)))[:3] if frame else []})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("module", help="an XLA dump's *after_optimizations.txt")
    args = p.parse_args(argv)
    with open(args.module) as f:
        found = kernels(f.read())
    for i, k in enumerate(found, 1):
        print(f"{i:5} {k['name'][:34]:34} {k['shape'][:32]:32} {k['kind'][:20]:20} "
              f"{k['op'][-40:]:40} {' < '.join(k['source'])}")
    print(f"{len(found)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
