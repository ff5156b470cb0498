"""The persistent compilation cache (jaxattn/compile_cache.py): a second process loads what
the first compiled, on the CPU too; servers and CLIs take it from --compilation-cache-dir."""

import os
import subprocess
import sys

from jaxattn import compile_cache
from jaxattn.serve.__main__ import build_parser
from jaxattn.serve.config import config_from_args

# Compiles a step-sized program and prints how many compilations the cache answered.
PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jaxattn import compile_cache

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
compile_cache.enable(sys.argv[1])

@jax.jit
def f(x):
    for i in range(20):
        x = jnp.tanh(x @ x + i)
    return x

f(jnp.ones((32, 32))).block_until_ready()
print(len(hits))
"""


def _run(path):
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    r = subprocess.run([sys.executable, "-c", PROGRAM, path], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_a_second_process_loads_the_compiled_program(tmp_path):
    path = str(tmp_path / "cache")
    assert _run(path) == 0
    assert any(name.startswith("jit_f-") for name in os.listdir(path))
    assert _run(path) >= 1  # f (and the small ops) come from the cache
    assert _run("none") == 0


def test_prune_keeps_the_recently_used_entries(tmp_path):
    for i in range(10):
        p = tmp_path / f"e{i}-cache"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (i, i))  # e0 is the least recently used
    assert compile_cache.prune(str(tmp_path), max_bytes=20_000) == 0
    assert compile_cache.prune(str(tmp_path), max_bytes=8_000) == 6000
    assert sorted(os.listdir(tmp_path)) == [f"e{i}-cache" for i in range(6, 10)]


def test_the_flag_reaches_the_engine_config():
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))
    assert parse().compilation_cache_dir is None  # the default directory
    assert parse("--compilation-cache-dir", "none").compilation_cache_dir == "none"
    assert compile_cache.default_dir() == os.environ[compile_cache.ENV]  # the suite's, exported
