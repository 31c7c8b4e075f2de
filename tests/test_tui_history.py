"""The History screen: btune bench's history (written through tuner.bench.history, no workload run), opened by
F4 and the palette: the job and figure choices, the chart, the change point, the runs, a run opened."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tui_support import copy_runs, make_app, recorded, run, until
from textual.widgets import DataTable, Select

from tuner.bench.history import History
from tuner.tui.screens.history import HISTORY_FILE, HistoryScreen
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.replay import ReplayScreen
from tuner.tui.widgets.chart import XYChart

STEP = [100.5, 99.8, 100.2, 150.1, 149.7, 150.4]  #: step_ms.p50 per round: a step up after round 3


def write_history(path: Path, run_id: str) -> list[int]:
    """Six rounds of jobs j (step_ms.p50 with a step at round 4, tokens_per_s flat) and k (duration); round 6's
    j run is ``run_id``."""
    h = History(path)
    ids = []
    for i, step in enumerate(STEP):
        rnd = h.start_round("nightly", "hash", f"sha{i}", f"/res/{i}", started=1_764_547_200 + 86_400 * i)
        h.add_job(rnd, "j", [{"repeat": 1, "run_id": run_id if i == 5 else f"r{i}", "status": "ok",
                              "metrics": [("step_ms.p50", step, "ms"), ("tokens_per_s", 1000.0 + i % 2, "tok/s")]}])
        h.add_job(rnd, "k", [{"repeat": 1, "run_id": f"k{i}", "status": "ok", "metrics": [("duration", 5.0, "s")]}])
        h.end_round(rnd, {"gpu": "H200"})
        ids.append(rnd)
    h.close()
    return ids


async def open_history(pilot) -> HistoryScreen:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the launch screen")
    await pilot.press("f4")
    screen = app.screen
    assert isinstance(screen, HistoryScreen)
    await until(pilot, lambda: screen.loaded, 10, "the history")
    await pilot.pause()
    return screen


@pytest.mark.slow
def test_history_screen_chart_change_point_runs_and_replay(tmp_path):
    runs_dir = copy_runs(tmp_path / "runs")
    run_id = recorded("dense")["id"]
    rounds = write_history(runs_dir / HISTORY_FILE, run_id)

    async def body():
        app = make_app(runs_dir)
        async with app.run_test(size=(110, 40)) as pilot:
            screen = await open_history(pilot)
            assert screen.jobs() == ["j", "k"] and screen.metrics("j") == ["step_ms.p50", "tokens_per_s"]
            job, metric = screen.query_one("#history-job", Select), screen.query_one("#history-metric", Select)
            assert job.value == "j" and metric.value == "step_ms.p50"
            s = screen.current
            assert s is not None and s.rounds == tuple(rounds) and s.means == tuple(STEP)
            chart = screen.query_one(XYChart)
            assert len(chart.lines) == 1 and len(chart.lines[0].xs) == 6  # a point per round
            assert list(s.changes) == [rounds[3]]  # the change point: round 4
            assert chart.rules == ((float(rounds[3]), "red"),) and chart.marks[1].xs == (float(rounds[3]),)
            assert "change at round 4" in str(screen.query_one("#history-changes").render())
            table = screen.query_one(DataTable)
            assert table.row_count == 6
            top = table.get_row_at(0)
            assert top[0] == str(rounds[5]) and top[2] == "sha5" and top[3] == "150.4" and top[4] == run_id
            assert table.get_row_at(5)[4] == "r0"
            # another figure, another job
            metric.value = "tokens_per_s"
            await pilot.pause()
            assert screen.current.metric == "tokens_per_s" and not screen.current.changes and not chart.rules
            job.value = "k"
            await pilot.pause()
            assert metric.value == "duration" and table.row_count == 6
            job.value = "j"
            await pilot.pause()
            metric.value = "step_ms.p50"
            await pilot.pause()
            # Enter on the top row (round 6, a recorded run): its replay
            table.focus()
            table.move_cursor(row=0)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen), 10, "the replay screen")
            assert app.screen.record["id"] == run_id
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen, 10, "back")
            # a run not in the runs directory: says so, stays here
            table.move_cursor(row=1)
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen is screen

    run(body())


def test_history_screen_without_a_history_says_how_to_make_one(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_history(pilot)
            text = str(screen.query_one("#history-title").render())
            assert "no bench history at" in text and "btune bench CONFIG.toml" in text
            assert not screen.jobs() and screen.query_one(DataTable).row_count == 0
            assert not (tmp_path / HISTORY_FILE).exists()  # reading made no file

    run(body())


@pytest.mark.slow
def test_the_palette_lists_history(tmp_path):
    from tuner.tui.screens.commands import ScreenCommands

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the launch screen")
            assert "History" in [name for name, _, _ in ScreenCommands(app.screen).commands()]
            await pilot.press("ctrl+p")
            await pilot.press(*"History")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, HistoryScreen), 10, "the history screen")

    run(body())


def test_history_screen_an_unreadable_history_is_one_line(tmp_path):
    (tmp_path / HISTORY_FILE).write_bytes(b"not a database, but long enough to be read as a header" * 20)

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_history(pilot)
            text = str(screen.query_one("#history-title").render())
            assert "cannot use history" in text and "\n" not in text.strip() and not screen.jobs()

    run(body())
