"""Shared fixtures. Helpers shared by the test modules are in support.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("BTUNE_RUNS_DIR", str(d))
    return d


@pytest.fixture
def fresh_dynamo() -> None:
    """Compiled code starts afresh (a fresh recompile budget), so one test's shapes do not use up another's;
    use it with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    import torch

    torch._dynamo.reset()
