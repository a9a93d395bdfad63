"""The checks that keep the code as it is: ruff's formatting and lint rules, and mypy.

Each runs the tool the ``test`` extras install, with the settings in pyproject.toml, over the
whole tree, and fails with the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_formatted_by_ruff() -> None:
    """Every file is as ``ruff format`` leaves it (run it to fix)."""
    done = run_tool("ruff", "format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_lint_rules_hold() -> None:
    done = run_tool("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing() -> None:
    """mypy over the packages, the tests and the benchmarks, stale ``type: ignore`` included."""
    done = run_tool("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
