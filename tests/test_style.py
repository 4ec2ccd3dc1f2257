"""The sources follow the style CI would otherwise only suggest: ruff's lint rules and formatter (pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["flowalign", "rewards", "tests", "bench"]


@pytest.mark.parametrize(
    ("args", "fix"), [(["check"], "ruff check --fix"), (["format", "--check"], "ruff format")], ids=["lint", "format"]
)
def test_sources_pass_ruff(args: list[str], fix: str) -> None:
    run = subprocess.run([sys.executable, "-m", "ruff", *args, *SOURCES], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(args)} failed (fix with `{fix}`):\n{run.stdout}{run.stderr}"
