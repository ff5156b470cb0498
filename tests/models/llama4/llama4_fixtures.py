"""Paths and readers for the transformers parity fixtures (see make_fixtures.py)."""

import os

import numpy as np
from safetensors.numpy import load_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CONFIG_NAMES = ("moe_dense", "tied_top2")


def checkpoint(name: str) -> str:
    return os.path.join(FIXTURES, name)


def expected(name: str) -> dict[str, np.ndarray]:
    """input_ids [B, L], logits [B, L, V], prompt [P], greedy_tokens [32],
    greedy_logits [P + 32, V] (teacher-forced over prompt + tokens), inv_freq [D/2]."""
    return load_file(os.path.join(FIXTURES, name, "expected.safetensors"))


def max_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
