"""The README's generated tables, rewritten from the commands that print them.

    python -m benchmarks.readme_tables          # rewrite README.md's generated blocks
    python -m benchmarks.readme_tables --check  # exit 1 if any block differs (the tests do)

A block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` and
holds exactly what its command prints, so the README cannot drift from the code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def plan_memory() -> str:
    """``python -m jaxattn.plan_memory`` with JAX's default memory fraction (0.75)."""
    from jaxattn.serve import plan_memory as cmd

    saved = os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if cmd.main([]) != 0:
                raise RuntimeError("python -m jaxattn.plan_memory failed")
    finally:
        if saved is not None:
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = saved
    return out.getvalue().strip()


BLOCKS = {"plan_memory": plan_memory}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {name} -->)\n(.*?\n)?(<!-- end generated: {name} -->)",
                      re.S)


def render(text: str) -> str:
    """``text`` (the README) with every generated block replaced by its command's output."""
    for name, fn in BLOCKS.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise ValueError(f"README.md has no generated block {name!r}")
        body = fn()
        text = pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(3)}", text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = p.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's generated blocks are stale: run python -m benchmarks.readme_tables",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
