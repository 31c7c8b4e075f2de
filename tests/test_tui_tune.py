"""The Tune screen: btune tune's studies (written through tuner.tune.store, no workload run), opened by F6 and the
palette: the trials, the chart with the front marked, the best line, another study, a trial's record opened; and
(slow) a real tiny tune started from the screen, followed, and stopped early."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import pytest
from test_tui_support import NO_GPU, copy_runs, make_app, recorded, run, until
from textual.widgets import DataTable, Input, Select

from tuner import runs
from tuner.bench.history import History
from tuner.tui.screens.history import HISTORY_FILE
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.replay import ReplayScreen
from tuner.tui.screens.tune import TuneDialog, TuneScreen, tune_argv
from tuner.tui.widgets.chart import XYChart
from tuner.tune.main import add_arguments, make_plan
from tuner.tune.store import Store

MIB = 1024 * 1024
#: (batch_size, state, tokens/s, peak MiB) of the first study's trials: 2 is the best, 1 and 2 the front
#: (tokens/s against peak memory), 4 dominated by 2, 8 out of memory.
TRIALS = [(1, "ok", 1000.0, 100), (2, "ok", 1800.0, 150), (4, "ok", 1700.0, 300), (8, "oom", None, None)]


def plan(workload_args: list[str]) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--space", "batch_size=1..16", "--budget", "6", "--trial-seconds", "1"])
    return make_plan("dense", workload_args, args, NO_GPU.machine).as_json()


def write_studies(runs_dir: Path, record_path: Path, run_id: str) -> tuple[int, int]:
    """A finished study (TRIALS and one pruned setting; trial 1's record is ``record_path``) and a newer
    interrupted one with a single trial that measured no peak."""
    history = History(runs_dir / HISTORY_FILE)
    store = Store(history)
    fixed = ["--device", "cpu", "--compile-mode", "none", "--tp", "1"]
    first = store.create("first", "dense", plan(fixed), str(runs_dir / "tune-1"), "none", "host")
    for number, (bs, state, tps, peak) in enumerate(TRIALS, 1):
        trial = store.start_trial(first, number, {"batch_size": bs}, 0, "grid", 5 * MIB, None)
        store.end_trial(trial, state, None if state == "ok" else "out of memory", [tps] if tps else None,
                        {"tokens_per_s": tps, "peak_bytes": peak * MIB} if tps else {},
                        peak * MIB if peak else None, run_id if number == 1 else None,
                        str(record_path) if number == 1 else None, 3.0)
    store.pruned(first, [({"batch_size": 16}, "over --max-memory", None, None)])
    store.set_state(first, "done", 42.0)
    second = store.create("second", "dense", plan(fixed), str(runs_dir / "tune-2"), "none", "host")
    trial = store.start_trial(second, 1, {"batch_size": 2}, 0, "grid", None, None)
    store.end_trial(trial, "ok", None, [500.0], {"tokens_per_s": 500.0}, None, None, None, 2.0)
    store.set_state(second, "interrupted", 5.0)
    history.close()
    return first, second


async def open_tune(pilot) -> TuneScreen:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the launch screen")
    await pilot.press("f6")
    screen = app.screen
    assert isinstance(screen, TuneScreen)
    await until(pilot, lambda: screen.loaded, 10, "the history")
    await pilot.pause()
    return screen


@pytest.mark.slow  # runs the app for seconds (a replay opened)
def test_tune_screen_trials_front_best_and_a_trial_replayed(tmp_path):
    runs_dir = copy_runs(tmp_path / "runs")
    rec = recorded("dense")
    first, second = write_studies(runs_dir, runs.resolve_run(rec["id"], runs_dir), rec["id"])

    async def body():
        app = make_app(runs_dir)
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await open_tune(pilot)
            select = screen.query_one("#tune-study", Select)
            assert screen.study["id"] == second and select.value == second  # the newest first
            # a study without peaks: x is the trial number
            chart = screen.query_one(XYChart)
            assert screen.points()[1] == "trial" and chart.marks[1].xs == (1.0,) and chart.marks[1].ys == (500.0,)
            select.value = first
            await until(pilot, lambda: screen.study["id"] == first, 10, "the first study")
            await pilot.pause()
            table = screen.query_one(DataTable)
            assert table.row_count == 5  # four trials, then the pruned setting
            assert [str(c.label) for c in table.columns.values()] == [
                "#", "phase", "rung", "setting", "state", "tokens_per_s", "peak MiB"]  # tokens/s: the objective
            top = table.get_row_at(0)
            assert top[0] == "1" and top[3] == "batch_size=1" and str(top[4]) == "ok"
            assert top[5] == "1,000.0" and top[6] == "100.0"
            assert str(table.get_row_at(3)[4]) == "oom: out of memory"
            last = table.get_row_at(4)
            assert last[0] == "-" and str(last[4]) == "pruned: over --max-memory"
            # every ok trial charted against its peak; the front (1 and 2) marked apart from the rest (4)
            assert screen.points()[1] == "peak MiB"
            rest, front = chart.marks
            assert rest.xs == (300.0,) and rest.ys == (1700.0,)
            assert front.xs == (100.0, 150.0) and front.ys == (1000.0, 1800.0) and front.char == "◆"
            best = str(screen.query_one("#tune-best").render())
            assert "best: batch_size=2" in best and "btune run dense" in best and "--batch-size 2" in best
            assert "done" in str(screen.query_one("#tune-state").render())
            # Enter on trial 1 (a recorded run): its replay
            table.focus()
            table.move_cursor(row=0)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen), 10, "the replay screen")
            assert app.screen.record["id"] == rec["id"]
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen, 10, "back")
            # a trial without a record (out of memory): says so, stays here
            table.move_cursor(row=3)
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen is screen
            # stop without a tune running: a warning, nothing else
            await pilot.press("s")
            await pilot.pause()
            assert app.screen is screen and app.tune_process is None

    run(body())


def test_tune_screen_without_a_history_and_the_palette(tmp_path):
    from tuner.tui.screens.commands import ScreenCommands

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_tune(pilot)
            assert "no history at" in str(screen.query_one("#tune-title").render())
            assert screen.study is None and screen.query_one(DataTable).row_count == 0
            assert not (tmp_path / HISTORY_FILE).exists()  # reading made no file
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "back")
            assert "Tune" in [name for name, _, _ in ScreenCommands(app.screen).commands()]

    run(body())


def test_tune_argv_fixes_the_form_and_the_knobs_left_out_of_the_space():
    values = {"preset": "tiny", "device": "cpu", "steps": 5, "batch_size": 4}
    argv = tune_argv(Path("runs"), "dense", values, "3", "1", "batch_size=1,2 compile_mode=none,default", "py")
    assert argv[:10] == ["py", "-m", "tuner", "tune", "--out", "runs", "--budget", "3", "--trial-seconds", "1"]
    spaces = [argv[i + 1] for i, a in enumerate(argv) if a == "--space"]
    # the space as given (the form's batch size tuned, not fixed), every other declared knob that applies pinned
    assert spaces == ["batch_size=1,2", "compile_mode=none,default", "fp8_mode=off", "attention_backend=auto",
                      "tp=1", "activation_checkpointing=false"]
    assert argv[argv.index("dense"):] == ["dense", "--preset", "tiny", "--device", "cpu"]  # no --steps


@pytest.mark.slow  # a real tune: a tiny dense model trained on the CPU
def test_tune_screen_starts_follows_and_stops_a_tune(tmp_path):
    runs_dir = tmp_path / "runs"

    async def body():
        app = make_app(runs_dir)
        try:
            async with app.run_test(size=(120, 40)) as pilot:
                await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the launch screen")
                launch = app.screen
                await until(pilot, lambda: launch.form is not None, 10, "the form")
                launch.set_option("device", "cpu")
                await until(pilot, lambda: launch.ready, 10, "the command")
                screen = await open_tune(pilot)
                await pilot.press("n")
                await until(pilot, lambda: isinstance(app.screen, TuneDialog), 10, "the dialog")
                dialog = app.screen
                for field, value in (("budget", "3"), ("seconds", "1"), ("space", "batch_size=1,2")):
                    dialog.query_one(f"#tune-{field}", Input).value = value
                await pilot.press("enter")
                await until(pilot, lambda: app.tune_process is not None, 10, "the tune to start")
                tune = app.tune_process
                argv = tune.argv
                assert argv[argv.index("dense") + 1:] == ["--preset", "tiny", "--device", "cpu"]
                assert {"batch_size=1,2", "compile_mode=none", "tp=1"} <= set(argv)
                await until(pilot, lambda: any(t["state"] != "pruned" for t in screen.trials), 120, "a trial")
                assert screen.study["id"] == tune.study_id and screen.query_one(DataTable).row_count >= 1
                await pilot.press("s")
                assert tune.stopping
                await until(pilot, lambda: not tune.alive, 60, "the tune to stop")
                await until(pilot, lambda: screen.study["state"] in ("interrupted", "done"), 10, "the study's end")
                assert tune.proc.returncode in (0, 1), tune.log.read_text()
                assert "exited" in str(screen.query_one("#tune-state").render())
        finally:
            tune = app.tune_process
            if tune is not None and tune.alive:
                tune.proc.send_signal(signal.SIGKILL)
                tune.proc.wait()

    run(body())
