"""The whole tree (actors, supervisor, tests, ops) passes ruff, ruff format and mypy --strict,
as configured in pyproject.toml: a change that breaks any of them fails the suite, not review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO

RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize(
    "command",
    [[str(RUFF), "check", "."], [str(RUFF), "format", "--check", "."], [sys.executable, "-m", "mypy"]],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_the_tree_is_clean(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
