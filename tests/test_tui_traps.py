"""The app's traps fixed (issue 17, items 2, 4 and 5), driven by Textual's Pilot: the form shows what the preset
resolves options to, the command line follows the form, Enter and Mark are in the runs screen's footer, help and
palette, the palette lists Quit once, the quit dialog follows the run, a dry run shows its plan and writes no
record, and the runs and compare screens show the options that differ. The tests that drive the app are
slow (they run it for seconds; no process is started: the run and the dry run are stood in for) and
the pieces behind them have quick tests."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest
from test_tui_support import copy_runs, make_app, open_runs, recorded, run, until
from textual.widgets import DataTable, Input

from tuner import runs
from tuner.launch import build_config
from tuner.runner import RunResult
from tuner.tui.screens import live as live_module
from tuner.tui.screens import plan as plan_module
from tuner.tui.screens.commands import ScreenCommands
from tuner.tui.screens.compare import CompareScreen
from tuner.tui.screens.dialogs import ConfirmScreen, HelpScreen
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.live import LiveScreen
from tuner.tui.screens.plan import PlanScreen
from tuner.tui.screens.replay import ReplayScreen


async def launch_screen(pilot) -> LaunchScreen:
    screen = pilot.app.screen
    assert isinstance(screen, LaunchScreen)
    await until(pilot, lambda: screen.ready, 10, "the launch screen's command")
    return screen


def palette_names(screen, app) -> list[str]:
    """Every command the palette lists on ``screen``: btune's, then Textual's system commands."""
    names = [name for name, _, _ in ScreenCommands(screen).commands()]
    return names + [c.title for c in app.get_system_commands(screen)]


# -- the form and the command line -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_form_shows_what_the_preset_resolves_options_to(tmp_path):
    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await launch_screen(pilot)
            batch = screen.query_one("#opt-batch_size", Input)
            assert batch.value == "" and batch.placeholder == "preset: 8"  # was "0" (dense), blank (moe)
            assert screen.query_one("#opt-seq_len", Input).placeholder == "preset: 128"
            screen.set_option("preset", "llama-3.1-8b")
            await until(pilot, lambda: screen.query_one("#opt-seq_len", Input).placeholder == "preset: 8192", 10)
            assert screen.query_one("#opt-layers", Input).placeholder == "preset: 32"
            values, _ = screen.form.collect()
            assert "batch_size" not in values  # blank is the default
            screen.select_workload("moe")
            await until(pilot, lambda: screen.spec.name == "moe" and screen.ready, 20, "the moe form")
            assert screen.query_one("#opt-num_experts", Input).placeholder == "preset: 8"  # unset: the same way
            assert screen.query_one("#opt-batch_size", Input).placeholder == "preset: 8"
            assert str(screen.query_one("#note-router").render()) == "preset: sigmoid"
            assert str(screen.query_one("#note-balance").render()) == "preset: aux-free"
            assert screen.query_one("#opt-capacity_factor", Input).placeholder == "unset"
            screen.form.focus_option("top-k")
            await pilot.pause()
            assert "default unset → 2 (preset tiny)" in str(screen.query_one("#opt-help").render())

    run(body())


@pytest.mark.slow
def test_the_command_line_follows_the_form_after_many_changes(tmp_path):
    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await launch_screen(pilot)
            machine = app.machine.machine
            for trial in range(6):
                screen.form.focus_option("seq-len")
                await pilot.press("backspace", "backspace", *str(trial + 10))
                screen.set_option("mode", ["train", "prefill"][trial % 2])
                screen.set_option("warmup", str(trial % 4))
                screen.set_option("steps", str(trial + 1))
                assert not screen.ready  # the changes are not shown yet, whatever their messages are doing
                await until(pilot, lambda: screen.ready, 10, "the command")
                values, errors = screen.form.collect()
                assert not errors
                expected = build_config("dense", values, python="python", machine=machine).command_line
                assert str(screen.query_one("#command").render()) == f"$ {expected}"
                assert f"--seq-len {trial + 10}" in expected and f"--steps {trial + 1}" in expected

    run(body())


@pytest.mark.slow
def test_launch_right_after_a_change_launches_the_change(tmp_path):
    async def body():
        app = make_app(tmp_path, python="python")
        launched = []
        app.launch = launched.append  # type: ignore[method-assign]
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await launch_screen(pilot)
            screen.set_option("steps", "5")
            screen.set_option("mode", "prefill")
            await pilot.press("ctrl+r")
            await until(pilot, lambda: bool(launched), 10, "the launch")
            assert launched[0].options["steps"] == 5 and launched[0].options["mode"] == "prefill"

    run(body())


# -- the runs screen -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_runs_screen_shows_enter_and_mark_in_footer_help_and_palette(tmp_path):
    directory = copy_runs(tmp_path / "runs")

    async def body():
        app = make_app(directory)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_runs(pilot)
            footer: dict[str, set[str]] = {}
            for key, active in screen.active_bindings.items():
                if active.binding.show:
                    footer.setdefault(active.binding.description, set()).add(key)
            assert footer.get("Replay") == {"enter"} and footer.get("Mark & next") == {"space", "m"}
            names = palette_names(screen, app)
            assert "Replay" in names and "Mark & next" in names
            assert "moves the cursor to the next row" in screen.HELP
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            keys = str(app.screen.keys)
            assert "⏎  Replay" in keys and "space, m  Mark & next" in keys
            await pilot.press("escape")
            table = screen.query_one(DataTable)
            ok = next(k for k, r in screen.rows.items() if r.status == "ok")
            table.move_cursor(row=table.get_row_index(ok))
            await pilot.press("m")
            assert screen.marked == [ok] and table.cursor_row == table.get_row_index(ok) + 1  # marked, moved
            table.move_cursor(row=table.get_row_index(ok))
            await pilot.press("enter")
            assert isinstance(app.screen, ReplayScreen)

    run(body())


@pytest.mark.slow
@pytest.mark.parametrize("size", [(80, 24), (120, 30)])
def test_runs_screen_options_column_shows_what_differs_uncut(tmp_path, size):
    directory = copy_runs(tmp_path / "runs")

    async def body():
        app = make_app(directory)
        async with app.run_test(size=size) as pilot:
            screen = await open_runs(pilot)
            await pilot.pause(0.3)
            row = next(r for r in screen.rows.values() if r.path.name.endswith("dense-0049.json"))
            assert row.options == "steps=6 batch_size=4"  # what differs between the dense runs
            table = screen.query_one(DataTable)
            column = next(c for c in table.columns.values() if c.key.value == "options")
            width = column.get_render_width(table)
            assert width - 2 >= len(row.options)  # the options column holds it
            title = str(screen.query_one("#runs-title").render())
            assert ("time, energy: 100+ columns" in title) == (size[0] < 100)

    run(body())


# -- the compare screen ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_screen_names_columns_by_options_with_units(tmp_path):
    data = Path(__file__).parent / "data" / "runs"
    recs = [runs.load_record(p) for p in sorted(data.glob("*-dense-[07]*.json"))]
    recs = [r for r in recs if r["status"] == "ok"][:2]

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 30)) as pilot:
            await app.push_screen(CompareScreen(recs))
            await pilot.pause()
            screen = app.screen
            table = screen.query_one(DataTable)
            labels = [str(c.label) for c in table.columns.values()]
            assert labels[0] == "batch_size" and labels[1:] == ["0", "4"]  # not base / #1, not ids
            rows = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
            assert "step time p50 [ms]" in rows and "throughput (steady tokens / steady time) [tok/s]" in rows
            legend = str(screen.query_one("#compare-legend").render())
            assert all(r["id"] in legend for r in recs) and "batch_size=4" in legend

    run(body())


# -- the palette and the quit dialog -------------------------------------------------------------------
@pytest.mark.slow
def test_the_palette_lists_quit_once(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await launch_screen(pilot)
            names = palette_names(screen, app)
            assert names.count("Quit") == 1 and "Theme" in names

    run(body())


class HeldRunner:
    """A run that stays live until ``end`` is set, then returns a recorded run's record (no process)."""

    def __init__(self) -> None:
        self.rec = recorded("dense")
        self.run_id, self.end, self.proc = self.rec["id"], threading.Event(), None

    def subscribe(self, fn) -> None:
        pass

    def start(self) -> None:
        pass

    def wait(self) -> RunResult:
        self.end.wait(30)
        return RunResult(self.run_id, "ok", 0, Path("x.json"), self.rec)

    def cancel(self, reason: str = "") -> None:
        self.end.set()


@pytest.mark.slow
def test_the_quit_dialog_follows_a_run_that_ends_while_it_is_open(tmp_path, monkeypatch):
    held = HeldRunner()
    monkeypatch.setattr(live_module, "make_runner", lambda *a, **k: held)
    config = build_config("dense", {"steps": 3}, python="python")

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await launch_screen(pilot)
            app.launch(config)
            await until(pilot, lambda: isinstance(app.screen, LiveScreen), 10, "the live screen")
            live = app.screen
            await pilot.press("q")
            dialog = app.screen
            assert isinstance(dialog, ConfirmScreen) and dialog.question.startswith("A run is live")
            held.end.set()  # the run ends while the dialog is open
            await until(pilot, lambda: not live.is_live, 10, "the end of the run")
            await until(pilot, lambda: "has ended" in str(dialog.query_one("#question").render()), 5, "the question")
            assert "A run is live" not in str(dialog.query_one("#question").render())
            await pilot.press("n")
            await pilot.press("q")  # no run live: q quits at once
            await until(pilot, lambda: not app.is_running, 5, "the app to quit")

    run(body())


# -- a dry run from the app ------------------------------------------------------------------------------
PLAN = {"model": {"n_layers": 2}, "flops_per_token": 1234, "memory_estimate_bytes": {"total": 10}}


@pytest.mark.slow
def test_a_dry_run_from_the_app_shows_the_plan_and_writes_no_record(tmp_path, monkeypatch):
    seen: list[list[str]] = []

    def fake_plan(argv: list[str]) -> tuple[int, str, str]:
        seen.append(argv)
        return 0, orjson.dumps(PLAN).decode(), ""

    monkeypatch.setattr(plan_module, "run_plan", fake_plan)

    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await launch_screen(pilot)
            screen.set_option("dry-run", True)
            await pilot.press("ctrl+r")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen), 10, "the plan")
            plan = app.screen
            await until(pilot, lambda: plan.result is not None, 10, "the plan's output")
            assert not any(isinstance(s, LiveScreen) for s in app.screen_stack)
            assert "flops_per_token" in str(plan.query_one("#plan-body").render())
            await pilot.press("escape")
            assert app.screen is screen

    run(body())
    assert seen and "--dry-run" in seen[0]
    assert not list(tmp_path.iterdir())  # no record, no journal


@pytest.mark.slow
def test_a_real_dry_run_from_the_app(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await launch_screen(pilot)
            screen.set_option("dry-run", True)
            await pilot.press("ctrl+r")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen), 10, "the plan")
            await until(pilot, lambda: app.screen.result is not None, 120, "the plan's output")
            result = app.screen.result
            assert result.code == 0, result.stderr
            assert orjson.loads(result.stdout)["flops_per_token"] > 0

    run(body())
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_dry_run_that_fails_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "run_plan", lambda argv: (2, "", "error: --bogus\n"))

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await launch_screen(pilot)
            app.launch(build_config("dense", {"dry_run": True}, python="python"))
            await until(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.result is not None, 10)
            text = str(app.screen.query_one("#plan-body").render())
            assert "the dry run failed (exit 2)" in text and "--bogus" in text

    run(body())


# -- the pieces, quick ----------------------------------------------------------------------------------
def test_runs_columns_leave_time_and_energy_out_below_100_columns():
    from tuner.tui.screens.runs import columns_for

    narrow, wide = columns_for(80), columns_for(120)
    assert [k for k, _, _ in narrow] == ["mark", "workload", "status", "tok_s", "mfu", "options"]
    assert [k for k, _, _ in wide] == ["mark", "time", "workload", "status", "tok_s", "mfu", "energy", "options"]
    assert narrow[-1][2] >= 25 and wide[-1][2] >= 25  # room for what differs


def test_runs_rows_hold_the_differing_options_and_every_option():
    from tuner.tui.screens.runs import RunRow

    data = Path(__file__).parent / "data" / "runs"
    rows = {r.path.name: r for r in RunRow.load_all(sorted(data.glob("*.json")))}
    row = rows["20261121-063420-dense-0049.json"]
    assert row.options == "steps=6 batch_size=4" and "preset=tiny" in row.all_options
    assert rows["20261121-000000-dense-bad0.json"].status == "unreadable"


class StubLive:
    def __init__(self, live: bool, returncode: int | None) -> None:
        self.is_live = live
        self.runner = type("R", (), {"proc": type("P", (), {"returncode": returncode})()})()


def test_the_quit_question_says_what_the_run_is_doing():
    from tuner.tui.app import quit_question

    assert quit_question(StubLive(True, None)).startswith("A run is live")
    assert quit_question(StubLive(True, 0)) == "The run has ended; its record is being written. Quit once it is?"
    assert quit_question(StubLive(False, 0)) == "The run has ended and its record is written. Quit?"


def test_a_blank_field_reads_as_the_preset_or_unset():
    from tuner import catalog
    from tuner.tui.widgets.option_form import placeholder

    moe = catalog.get("moe")
    assert placeholder(moe.option("top-k"), catalog.preset_value(moe, moe.option("top-k"))) == "preset: 2"
    assert placeholder(moe.option("capacity-factor"), None) == "unset"
    assert placeholder(moe.option("warmup"), None) == ""
