import pathlib
import sys

# Shared helpers (attention_cases) live one level up; tests/ has no __init__.py.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
