"""Packaging: one import namespace, for editable and normal installs."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd="/"):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_subpackages_import_under_jaxattn_only():
    # Other distributions may own these names (transformers >= 5.25 installs Hugging Face's
    # `kernels`); what must not happen is this project's folders importing at the top level.
    r = _run("import importlib.util as u, jaxattn.kernels, jaxattn.models.llama4, jaxattn.serve\n"
             "for n in ('kernels', 'models', 'serve'):\n"
             "    s = u.find_spec(n)\n"
             "    print(n, s and (s.origin or list(s.submodule_search_locations)))")
    assert r.returncode == 0, r.stderr
    leaked = [line for line in r.stdout.splitlines()
              if str(ROOT / line.split()[0]) in line]  # e.g. ROOT/kernels, not ROOT/.venv
    assert not leaked, f"this project's folders import at the top level: {leaked}"


def test_serve_module_help_runs():
    r = subprocess.run([sys.executable, "-m", "jaxattn.serve", "--help"], cwd="/",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--max-model-len" in r.stdout


def test_wheel_holds_only_the_jaxattn_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-v", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    # Every importable folder is listed in `packages` (setuptools warns ~90 lines per one not).
    assert "absent from the `packages` configuration" not in r.stdout + r.stderr
    (wheel,) = tmp_path.glob("jaxattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"jaxattn"}, tops
    for module in ("jaxattn/kernels/__init__.py", "jaxattn/models/llama4/__init__.py",
                   "jaxattn/serve/__main__.py", "jaxattn/planner.py",
                   "jaxattn/serve/data/corpus.txt", "jaxattn/models/llama4/configs/scout.json"):
        assert module in names


@pytest.mark.slow
def test_readme_python_examples_run():
    """The README's Python snippets are executed as written (on the CPU)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_generated_blocks_are_current():
    """The README's plan-memory table is what ``python -m jaxattn.plan_memory`` prints
    (``python -m benchmarks.readme_tables`` rewrites it)."""
    from benchmarks import readme_tables

    text = (ROOT / "README.md").read_text()
    assert readme_tables.render(text) == text, (
        "README.md is stale: run python -m benchmarks.readme_tables")
