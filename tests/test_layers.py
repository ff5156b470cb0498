"""The folder tree is the architecture: every import points down the layers.

``serve`` -> ``models`` -> ``kernels`` -> the ``jaxattn`` core. The core reaches the kernels
only to dispatch to them (``jaxattn/api.py``), and the serving classes only through the
lazy ``jaxattn.LLM`` / ``SamplingParams`` / ``EngineConfig`` names and the two command-name
modules that run ``serve``'s CLIs.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> import prefix and the rank of its layer (an import may only go to a lower rank).
FOLDERS = {"jaxattn": ("jaxattn", 0), "kernels": ("jaxattn.kernels", 1),
           "models": ("jaxattn.models", 2), "serve": ("jaxattn.serve", 3)}
# Upward edges that are the point of their module (checked to exist, so this list cannot rot).
ALLOWED = {("jaxattn/api.py", "jaxattn.kernels"),
           ("jaxattn/__init__.py", "jaxattn.serve"),
           ("jaxattn/generate.py", "jaxattn.serve"),
           ("jaxattn/plan_memory.py", "jaxattn.serve")}


def _rank(module: str) -> int:
    best = 0
    for prefix, rank in FOLDERS.values():
        if module == prefix or module.startswith(prefix + "."):
            best = max(best, rank)
    return best


def _imports(path: pathlib.Path):
    """Every module a file imports (at any depth, lazy imports and strings run by runpy too)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from jaxattn import kernels` imports jaxattn.kernels
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("jaxattn."):
            yield node.value


def test_imports_point_down_the_layers():
    upward, used = [], set()
    for folder, (_, rank) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for module in _imports(path):
                if not module.startswith("jaxattn") or _rank(module) <= rank:
                    continue
                target = next(p for p, r in FOLDERS.values() if r == _rank(module))
                if (rel, target) in ALLOWED:
                    used.add((rel, target))
                else:
                    upward.append(f"{rel} imports {module}")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(set(upward)))
    assert used == ALLOWED, f"allowed edges no longer used: {ALLOWED - used}"

