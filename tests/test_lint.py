"""The tree passes `ruff check` and `ruff format --check` with the project's configuration (pyproject.toml
[tool.ruff]): unused imports, undefined names and statement errors fail the suite instead of accumulating, and the
code has one format (run `ruff format .` before committing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    if shutil.which("ruff"):
        return ["ruff"]
    try:
        import ruff  # noqa: F401  (the PyPI package ships the binary; `python -m ruff` runs it)
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e .[test])")
    result = subprocess.run(
        [*ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e .[test])")
    result = subprocess.run([*ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr
