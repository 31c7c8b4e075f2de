"""Snapshots of every screen, fed from the recorded runs in tests/data/runs (fixed sizes, no clocks shown).

Update after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and review
the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from test_tui_support import make_app, recorded, until
from textual.app import App
from textual.widgets import DataTable

from tuner.replay import timeline
from tuner.runner import RunResult
from tuner.tui.screens import live as live_module
from tuner.tui.screens.live import LiveScreen
from tuner.tui.screens.replay import ReplayScreen
from tuner.tui.screens.runs import RunsScreen

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow  # each snapshot runs the app for seconds


@pytest.fixture(autouse=True)
def _in_tests_dir(monkeypatch):
    """Relative runs directory (data/runs) so no machine-specific path is drawn; colours on."""
    monkeypatch.chdir(TESTS)
    monkeypatch.delenv("NO_COLOR", raising=False)


class ScreenApp:
    """An app that opens ``screen`` over the launch screen."""

    @staticmethod
    def make(screen_factory: Any, **kwargs: Any) -> App[int]:
        app = make_app(Path("data/runs"), python="python", **kwargs)

        async def open_screen() -> None:
            await app.push_screen(screen_factory())

        app.call_later(open_screen)
        return app


class RecordedRunner:
    """Stands in for the Runner: replays a recorded run's events to subscribers, then returns its record."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec, self.run_id, self.subs = rec, rec["id"], []

    def subscribe(self, fn: Any) -> None:
        self.subs.append(fn)

    def start(self) -> None:
        for ev in timeline(self.rec):
            for fn in self.subs:
                fn(ev)

    def wait(self) -> RunResult:
        rec = self.rec
        return RunResult(rec["id"], rec["status"], rec["exit_code"], Path(f"data/runs/{rec['id']}.json"), rec)

    def cancel(self) -> None:
        pass


async def _settle(pilot: Any) -> None:
    await pilot.pause(0.3)
    await pilot.pause()


async def _runs_loaded(pilot: Any) -> None:
    """The runs screen has its rows, and its table has sized its columns to them (done when idle)."""
    def ready() -> bool:
        screen = pilot.app.screen
        return (isinstance(screen, RunsScreen) and bool(screen.rows)
                and not screen.query_one(DataTable)._require_update_dimensions)

    await until(pilot, ready, 20, "the runs table")
    await pilot.pause(0.5)  # a load can re-flag the table's sizing once more: it must hold after a pause
    await until(pilot, ready, 20, "the runs table, settled")


def _launch(snap_compare: Any, size: tuple[int, int]) -> bool:
    async def ready(pilot: Any) -> None:
        await until(pilot, lambda: pilot.app.screen.form is not None and pilot.app.screen.ready, 30)
        await _settle(pilot)

    return snap_compare(make_app(Path("data/runs"), python="python"), terminal_size=size, run_before=ready)


def test_launch_screen(snap_compare):
    assert _launch(snap_compare, (80, 24))


def test_launch_screen_120x40(snap_compare):
    assert _launch(snap_compare, (120, 40))


def _runs(snap_compare: Any, size: tuple[int, int]) -> bool:
    async def ready(pilot: Any) -> None:
        await _runs_loaded(pilot)
        await _settle(pilot)

    app = ScreenApp.make(lambda: RunsScreen(Path("data/runs")))
    return snap_compare(app, terminal_size=size, run_before=ready)


def test_runs_screen(snap_compare):
    assert _runs(snap_compare, (80, 24))


def test_runs_screen_120x40(snap_compare):
    assert _runs(snap_compare, (120, 40))


def test_runs_screen_marked_and_unreadable_row(snap_compare):
    async def ready(pilot: Any) -> None:
        await _runs_loaded(pilot)
        table = pilot.app.screen.query_one(DataTable)
        await pilot.press("space", "down", "space")
        table.move_cursor(row=table.row_count - 1)
        await _settle(pilot)

    app = ScreenApp.make(lambda: RunsScreen(Path("data/runs")))
    assert snap_compare(app, terminal_size=(120, 24), run_before=ready)


SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.mark.parametrize("size", SIZES)
def test_replay_eight_gpus(snap_compare, size):
    """Eight fake GPUs at the end of the replay: each GPU panel folds them into one line."""
    rec = _fake_nvml_run()
    app = ScreenApp.make(lambda: ReplayScreen(rec, autoplay=False, at_end=True))
    assert snap_compare(app, terminal_size=size, run_before=_settle)


def test_replay_eight_gpus_expanded(snap_compare):
    """g: a row per GPU in power, memory and util."""
    async def expand(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("g")
        await _settle(pilot)

    rec = _fake_nvml_run()
    app = ScreenApp.make(lambda: ReplayScreen(rec, autoplay=False, at_end=True))
    assert snap_compare(app, terminal_size=(120, 40), run_before=expand)


@pytest.mark.parametrize("size", SIZES)
def test_replay_serving_latency_synthetic(snap_compare, size):
    rec = recorded("synthetic")
    app = ScreenApp.make(lambda: ReplayScreen(rec, autoplay=False, at_end=True))
    assert snap_compare(app, terminal_size=size, run_before=_settle)


#: A --find-max-rate curve for the synthetic serving run (fixed figures: no run's timing in the snapshot): 4/s and
#: 8/s within the SLOs, 16/s and 12/s not.
CURVE = [{"segment": k, "rate": rate, "request_throughput": rps, "output_tokens_per_s": rps * 64,
          "good_fraction": good, "passed": good >= 0.99, "ttft_ms": {"p50": ttft / 2, "p99": ttft},
          "tpot_ms": {"p50": tpot - 1, "p99": tpot}}
         for k, (rate, rps, good, ttft, tpot) in enumerate([(4.0, 3.91, 1.0, 14.2, 6.1), (8.0, 7.62, 1.0, 21.5, 6.4),
                                                            (16.0, 10.9, 0.5, 310.0, 9.9),
                                                            (12.0, 10.1, 0.9, 305.0, 8.0)])]


@pytest.mark.parametrize("size", SIZES)
def test_replay_serving_curve(snap_compare, size):
    """A rate search's curve in the serving panel (scrolled into view): throughput and TTFT/TPOT p99 against the
    offered rate, each load marked within the SLOs or not, the max rate as a rule, a row per load."""
    from tuner.tui.widgets.latency import LatencyPanel

    rec = copy.deepcopy(recorded("synthetic"))
    rec["summary"]["serving"].update(curve=CURVE, max_rate=8.0)

    async def ready(pilot: Any) -> None:
        def drawn() -> bool:
            panels = pilot.app.screen.query(LatencyPanel)
            return bool(panels) and all(c._drawn for c in panels.first().curve_charts.values())

        await until(pilot, drawn, 30, "the curve's charts")
        await _settle(pilot)
        pilot.app.screen.query_one("#panels-scroll").scroll_end(animate=False)
        await _settle(pilot)

    app = ScreenApp.make(lambda: ReplayScreen(rec, autoplay=False, at_end=True))
    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_compare_screen(snap_compare):
    assert _compare(snap_compare, (80, 24))


def test_compare_screen_120x40(snap_compare):
    assert _compare(snap_compare, (120, 40))


def _compare(snap_compare: Any, size: tuple[int, int]) -> bool:
    from tuner.tui.screens.compare import CompareScreen

    recs = [*_all_ok("dense")[:2], recorded("moe", "failed")]
    app = ScreenApp.make(lambda: CompareScreen(recs))

    async def ready(pilot: Any) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, CompareScreen)
                    and not pilot.app.screen.query_one(DataTable)._require_update_dimensions, 20)
        await _settle(pilot)

    return snap_compare(app, terminal_size=size, run_before=ready)


#: The live screen's runs: a recorded run of each workload, and the options its command line shows.
LIVE = {
    "dense": (lambda: _fake_nvml_run(), {"preset": "tiny", "steps": 8, "warmup": 2}),
    "moe": (lambda: recorded("moe"), {"preset": "tiny", "steps": 6, "warmup": 2, "balance_window": 2}),
    "serve": (lambda: recorded("serve"), {"preset": "tiny", "num_requests": 16}),
    "tp-validate": (lambda: recorded("tp-validate"), {"preset": "tiny"}),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("workload", list(LIVE))
def test_live_screen_after_a_run(snap_compare, monkeypatch, workload, size):
    """The live screen once a run has ended, fed a recorded run's events (dense: the run of 8 fake GPUs)."""
    from tuner.launch import build_config

    record, options = LIVE[workload]
    rec = record()
    monkeypatch.setattr(live_module, "make_runner", lambda *a, **k: RecordedRunner(rec))
    config = build_config(workload, options, python="python")

    async def ready(pilot: Any) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, LiveScreen) and not pilot.app.screen.is_live, 30)
        await _settle(pilot)

    app = ScreenApp.make(lambda: LiveScreen(config, Path("data/runs")))
    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_help_screen(snap_compare):
    """The help over an empty runs screen (no table rows whose column sizing could race the modal)."""
    from tuner.tui.screens.dialogs import HelpScreen

    async def ready(pilot: Any) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, RunsScreen), 30, "the runs screen")
        await _settle(pilot)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen), 30, "the help screen")
        await _settle(pilot)

    app = ScreenApp.make(lambda: RunsScreen(Path("data/no-runs-here")))
    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def _all_ok(workload: str) -> list[dict[str, Any]]:
    from tuner import runs

    out = []
    for path in sorted((TESTS / "data" / "runs").glob(f"*-{workload}-*.json")):
        try:
            rec = runs.load_record(path)
        except runs.RunFileError:
            continue
        if rec["status"] == "ok" and not rec["environment"].get("gpus"):
            out.append(rec)
    return out


def _fake_nvml_run() -> dict[str, Any]:
    from tuner import runs

    for path in sorted((TESTS / "data" / "runs").glob("*-dense-*.json")):
        try:
            rec = runs.load_record(path)
        except runs.RunFileError:
            continue
        if rec["environment"].get("gpu_count") == 8:
            return rec
    raise LookupError("no recorded run with 8 (fake) GPUs")


# -- the bench history -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_history_screen(snap_compare, monkeypatch, tmp_path, size):
    """Six rounds with a step at round 4 (tests/test_tui_history.py's history), from a relative runs directory."""
    from test_tui_history import write_history

    from tuner.tui.screens.history import HISTORY_FILE, HistoryScreen

    (tmp_path / "runs").mkdir()
    write_history(tmp_path / "runs" / HISTORY_FILE, "20261121-063414-dense-775d")
    monkeypatch.chdir(tmp_path)

    async def ready(pilot: Any) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.loaded, 30)
        await _settle(pilot)

    app = ScreenApp.make(lambda: HistoryScreen(Path("runs")))
    assert snap_compare(app, terminal_size=size, run_before=ready)
