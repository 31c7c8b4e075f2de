"""Shared fixtures, and the tiers: a test that starts a process is marked ``slow``.

``pytest -m "not slow"`` is the quick tier (pure Python: summaries on synthetic series, option parsing, stats,
the protocol, the app on recorded runs); plain ``pytest`` runs everything. A quick-tier test that starts a
process (a subprocess, a workload through the runner, torchrun, tmux, a fork) fails, naming the marker it
needs. Helpers shared by the test modules are in support.py.
"""

from __future__ import annotations

import os
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


def pytest_configure(config: pytest.Config) -> None:
    """Where Python writes no bytecode (PYTHONDONTWRITEBYTECODE, as on CI), every process the suite starts
    (hundreds: btune, workloads, torchrun ranks) would compile btune's sources again, about a second of CPU each:
    compiled once here, by the controller, before any worker starts."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        import compileall
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        for name in ("tuner", "workloads", "btune", "tests"):
            if (root / name).is_dir():
                compileall.compile_dir(root / name, quiet=1, workers=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Any:
    """Without bytecode writing pytest rewrites the asserts of every test module at every run (about 11 s of the
    quick tier on two cores): while it collects, it may cache the rewritten modules (it reads the cache anyway)."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


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


#: The modules that take longest in the full suite (seconds of test time, measured on the 2-core CI machine, most
#: first). ``pytest -n 2 --dist worksteal`` hands each worker a contiguous share of the collection and lets an idle
#: worker steal the tail of the other's queue; these modules are dealt out over the shares and put at their starts,
#: so each worker begins with long runs and both end on quick tests, not one worker alone in a long run at the end.
LONGEST_FIRST = ("test_dp", "test_serve_engine", "test_tune", "test_serve_tp", "test_tp", "test_dense",
                 "test_perplexity", "test_tui", "test_integrations", "test_api_server", "test_bench", "test_slurm",
                 "test_endpoint_servers", "test_faults", "test_serve_prefill", "test_quality_gate", "test_prometheus",
                 "test_tp_stop", "test_tp_validate_tolerance", "test_parse", "test_moe_cli", "test_significance",
                 "test_command", "test_fuzz", "test_cli", "test_rate_search")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the LONGEST_FIRST modules dealt round-robin to the workers' shares, each at its share's start;
    a module's tests stay together and in their order (its module-scoped fixtures are set up once)."""
    shares = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if shares < 2 or not items:
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    heavy: list[list[pytest.Item]] = [[] for _ in range(shares)]
    rest: list[pytest.Item] = []
    for item in items:
        i = rank.get(item.module.__name__ if item.module else "")
        (heavy[i % shares] if i is not None else rest).append(item)
    for group in heavy:
        group.sort(key=lambda item: rank[item.module.__name__])  # stable: a module's own order kept
    ordered: list[pytest.Item] = []
    for j, group in enumerate(heavy):
        start = len(items) * j // shares  # where xdist's share j starts: fill up to it with quick modules
        while len(ordered) < start and rest:
            ordered.append(rest.pop(0))
        ordered += group
    items[:] = ordered + rest
