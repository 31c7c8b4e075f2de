"""Shared fixtures: the runs directory, and the path of the test programs."""

import sys
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("BTUNE_RUNS_DIR", str(d))
    return d


def program(name: str, *args: str) -> list[str]:
    """argv for a test program under tests/programs."""
    return [sys.executable, str(PROGRAMS / name), *args]
