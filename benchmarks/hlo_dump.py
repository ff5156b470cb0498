"""Which source lines an XLA kernel in a profile comes from, by XLA's HLO dump.

A step runs inside CUDA command buffers, so the profiler's events name each kernel (the
fusion's name, ``loop_reduce_fusion_47``) but not the HLO op or the Python line that made it.
XLA's dump of the optimised module has both: the fusion instruction, the instructions it
fused, and each one's ``op_name`` and stack frame (file, line, function). Set
:func:`dump_flags` in ``XLA_FLAGS`` before JAX starts, then :func:`fusion_sources` maps a
profile's kernel names to those.
"""

from __future__ import annotations

import glob
import os
import re

_FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}$")
_LOCATION = re.compile(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
_NAMED = re.compile(r'^(\d+) "(.*)"$')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ", re.M)
_METADATA = re.compile(r'op_name="([^"]*)"(?: [^}]*?stack_frame_id=(\d+))?')


def dump_flags(directory: str, module: str | None = None) -> str:
    """``XLA_FLAGS`` entries that dump the modules (those whose name contains ``module``),
    as text, before and after optimisation."""
    only = f" --xla_dump_hlo_module_re=.*{re.escape(module)}.*" if module else ""
    return f"--xla_dump_to={directory} --xla_dump_hlo_as_text{only}"


def kernel_name(hlo_name: str) -> str:
    """The GPU kernel name XLA gives an HLO instruction (``loop_add_fusion.3`` ->
    ``loop_add_fusion_3``: characters other than letters, digits and _ become _)."""
    return re.sub(r"[^\w]", "_", hlo_name)


def _tables(text: str) -> dict[str, dict]:
    """The module's FileNames, FunctionNames, FileLocations and StackFrames tables."""
    tables: dict[str, dict] = {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(line, {})
            continue
        if not line.strip():
            section = None  # a table ends at a blank line
            continue
        if section is None:
            continue
        if m := _NAMED.match(line):
            section[int(m[1])] = m[2]
        elif m := _LOCATION.match(line):
            section[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]))
        elif m := _FRAME.match(line):
            section[int(m[1])] = (int(m[2]), int(m[3]) - 1)  # parent printed + 1; 0: none
    return tables


def _frames(tables: dict, frame_id: int, depth: int) -> list[str]:
    """``file:line (function)`` of a stack frame and its callers, innermost first."""
    out = []
    frames, locations = tables.get("StackFrames", {}), tables.get("FileLocations", {})
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    while frame_id in frames and len(out) < depth:
        location, parent = frames[frame_id]
        file_id, function_id, line = locations[location]
        path = files.get(file_id, "?")
        out.append(f"{os.path.relpath(path) if path.startswith('/') else path}:{line} "
                   f"({functions.get(function_id, '?')})")
        frame_id = parent
    return out


def _computations(text: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by the computation's name."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line):
            current = comps.setdefault(m[1], [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    return comps


def fusion_sources(directory: str, kernels, module: str = "", depth: int = 2) -> dict:
    """For each kernel name in ``kernels`` that an optimised module in the dump
    ``directory`` launches (the module whose file name contains ``module`` and that holds
    the most of them): ``{"hlo": its instruction's name, "ops": [(op_name, [frames]) of
    the instructions it fused, each once]}``. Kernels not found are left out."""
    files = [f for f in glob.glob(os.path.join(directory, "*after_optimizations.txt"))
             if module in os.path.basename(f)]
    best, best_hits, best_text = None, 0, ""
    wanted = set(kernels)
    for f in files:
        with open(f) as fh:
            text = fh.read()
        names = {kernel_name(m[1]) for m in _INSTRUCTION.finditer(text)}
        hits = len(wanted & names)
        if hits > best_hits:
            best, best_hits, best_text = f, hits, text
    if best is None:
        return {}
    tables, comps = _tables(best_text), _computations(best_text)
    out = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or kernel_name(m[1]) not in wanted or kernel_name(m[1]) in out:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = comps.get(called[1], []) if called else []
            ops = []
            for inner in body or [line]:
                meta = _METADATA.search(inner)
                if meta:
                    op = (meta[1], _frames(tables, int(meta[2]), depth) if meta[2] else [])
                    ops += [op] if op not in ops else []
            out[kernel_name(m[1])] = {"hlo": m[1], "ops": ops}
    return out
