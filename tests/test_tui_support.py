"""Support for the TUI tests (no tests here): apps with a fixed machine and interpreter name, waiting, recorded runs."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.pilot import Pilot

from tuner import runs
from tuner.machine import MachineInfo
from tuner.tui.app import BtuneApp
from workloads.options import Machine

DATA = Path(__file__).parent / "data" / "runs"
NO_GPU = MachineInfo(Machine(reason="NVML Shared Library Not Found"))


class DashboardApp(App[None]):
    """The live dashboard alone, in the app's stylesheet: panels fed by hand from a RunFeed."""

    CSS_PATH = Path(__file__).parents[1] / "tuner" / "tui" / "app.tcss"

    def compose(self) -> ComposeResult:
        from tuner.tui.widgets.dashboard import Dashboard

        yield Dashboard()


def recorded(workload: str, status: str = "ok") -> dict[str, Any]:
    """The first recorded run of ``workload`` with ``status`` under tests/data/runs."""
    for path in sorted(DATA.glob(f"*-{workload}-*.json")):
        try:
            rec = runs.load_record(path)
        except runs.RunFileError:
            continue
        if rec["status"] == status:
            return rec
    raise LookupError(f"no recorded {workload} run with status {status}")


def copy_runs(dest: Path) -> Path:
    """A copy of the recorded runs directory."""
    shutil.copytree(DATA, dest)
    return dest


def make_app(runs_dir: Path, **kwargs: Any) -> BtuneApp:
    """The app on a machine without GPUs, with ``python`` as the interpreter name in commands shown."""
    kwargs.setdefault("machine", NO_GPU)
    return BtuneApp(runs_dir, kwargs.pop("refresh_hz", 8.0), **kwargs)


async def until(pilot: Pilot[Any], cond: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Let the app run until ``cond()`` holds (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        await pilot.pause(0.1)


async def open_runs(pilot: Pilot[Any]) -> Any:
    """F2 from the launch screen: the runs screen, once its table has rows."""
    from tuner.tui.screens.runs import RunsScreen

    await pilot.press("f2")
    screen = pilot.app.screen
    assert isinstance(screen, RunsScreen)
    await until(pilot, lambda: bool(screen.rows), 10, "the runs")
    return screen


def run(coro: Any) -> Any:
    """Run a coroutine to the end (the tests are plain functions; no asyncio plugin needed)."""
    return asyncio.run(coro)
