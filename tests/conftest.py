"""Shared fixtures, and the tiers: a test that starts a process is marked ``slow``.

``pytest -m "not slow"`` is the quick tier (pure Python: summaries on synthetic series, option parsing, stats,
the protocol, the app on recorded runs); plain ``pytest`` runs everything. A quick-tier test that starts a
process (a subprocess, a workload through the runner, torchrun, tmux, a fork) fails, naming the marker it
needs. Helpers shared by the test modules are in support.py.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

#: The audit events (PEP 578) of starting a process: subprocess, os.fork (multiprocessing), exec and spawn.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.system",
                            "os.exec", "os.spawn", "pty.spawn"})
#: The quick-tier test running now, and what it started.
_quick: list[Any] = [None]
_started: dict[str, list[str]] = {}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in PROCESS_EVENTS and _quick[0] is not None:
        _started.setdefault(_quick[0], []).append(f"{event} {args[1] if len(args) > 1 else args!r}"[:200])


sys.addaudithook(_audit)  # a hook cannot be removed; it only records while a quick-tier test runs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _quick[0] = None if item.get_closest_marker("slow") else item.nodeid
    try:
        yield
    finally:
        _quick[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    started = _started.pop(item.nodeid, None) if call.when == "call" else None  # in its setup or its call
    if started and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} is in the quick tier but started a process; mark it "
                           f"@pytest.mark.slow (started: {started[0]}{' ...' if len(started) > 1 else ''})")


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
