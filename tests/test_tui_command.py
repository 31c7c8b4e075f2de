"""The launch screen's "command" entry (btune run -- CMD in the app): the command line typed and shown back as the
argv it will run, errors refused before launch, a real command launched to its record, listed and replayed.

The tests that drive the app are slow (they run it for seconds, as in test_tui_traps); the quick ones read a
command run's record the way the runs and replay screens do."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import pytest
from test_tui_support import make_app, open_runs, run, until
from textual.widgets import Button, Input, OptionList

from tuner import runs
from tuner.command import Command
from tuner.launch import command_config
from tuner.record import RecordBuilder
from tuner.replay import timeline
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.live import LiveScreen
from tuner.tui.screens.replay import ReplayScreen
from tuner.tui.screens.runs import RunRow
from tuner.tui.widgets.command_form import CommandForm
from tuner.tui.widgets.status import run_what
from tuner.tui.widgets.throughput import ThroughputPanel

PYTHON = shlex.quote(sys.executable)


async def _command_entry(pilot) -> LaunchScreen:
    """The launch screen with the command entry picked from the list by the keyboard (it is the last entry)."""
    screen = pilot.app.screen
    assert isinstance(screen, LaunchScreen)
    await until(pilot, lambda: screen.ready, 10, "the first workload's form")
    assert pilot.app.focused is screen.query_one("#workloads", OptionList)
    await pilot.press("end")
    await until(pilot, lambda: isinstance(screen.form, CommandForm) and screen.ready, 10, "the command form")
    return screen


def _shown(screen: LaunchScreen, selector: str) -> str:
    return str(screen.query_one(selector).render())


async def _set(pilot, screen: LaunchScreen, **fields: str) -> None:
    """Set the command form's fields and wait for the command line to show them."""
    for name, value in fields.items():
        screen.set_option(name, value)
    await pilot.pause()
    await until(pilot, lambda: screen.ready, 10, "the command built")


@pytest.mark.slow
def test_typed_command_line_is_shown_back_as_its_argv(tmp_path):
    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await _command_entry(pilot)
            assert screen.workload == "command" and "command" in _shown(screen, "#workload-info")
            assert screen.query_one("#cmd-cwd", Input).value == os.getcwd()  # the app's directory
            await pilot.press("enter")  # into the form: the command line has the focus
            assert app.focused is screen.query_one("#cmd-argv", Input)
            await pilot.press(*"torchrun --nproc")
            assert _shown(screen, "#cmd-argv-shown") == "argv: ['torchrun', '--nproc']"
            await pilot.press(*"-per-node 2 train.py")
            assert _shown(screen, "#cmd-argv-shown") == "argv: ['torchrun', '--nproc-per-node', '2', 'train.py']"
            await pilot.press(*" --msg 'two words'")
            assert _shown(screen, "#cmd-argv-shown").endswith("'train.py', '--msg', 'two words']")

            # the command line under the form: the redacted command, and the config a launch would run
            await _set(pilot, screen, argv=f"{PYTHON} train.py --api-key s3cret --lr 3e-4",
                       env="HF_TOKEN=abc MSG='a b'", parse="torchtitan")
            config = screen.config
            assert config is not None and config.workload == "command" and config.command is not None
            assert config.command.argv == (sys.executable, "train.py", "--api-key", "s3cret", "--lr", "3e-4")
            assert config.command.env == {"HF_TOKEN": "abc", "MSG": "a b"} and config.command.parse == "torchtitan"
            assert config.command.cwd == os.getcwd()
            line = _shown(screen, "#command")
            assert line == f"$ {PYTHON} train.py --api-key '<redacted>' --lr 3e-4" and "s3cret" not in line
            assert config.as_record()["options"]["env"] == {"HF_TOKEN": "<redacted>", "MSG": "a b"}
            assert not screen.query_one("#launch", Button).disabled
            await _set(pilot, screen, cwd="")  # blank: the app's directory
            assert screen.config is not None and screen.config.command.cwd is None

            # the palette's entries for the fields and back to a workload
            names = [name for name, _, _ in screen.commands()]
            assert {"Set command", "Set --env", "Workload command", "Workload dense"} <= set(names)
            screen.select_workload("dense")
            await until(pilot, lambda: screen.workload == "dense" and screen.ready, 10, "the dense form")
            assert screen.config is not None and screen.config.command is None

    run(body())


#: Fields of a command that cannot run, and the one line that says why.
REFUSED = [
    ({"argv": "no-such-program-btune x"}, "no-such-program-btune: command not found on PATH"),
    ({"argv": f"{PYTHON} 'unclosed"}, "cannot split the command: No closing quotation"),
    ({"argv": f"{PYTHON} -V", "cwd": "/no/such/dir"}, "--cwd /no/such/dir: not a directory"),
    ({"argv": f"{PYTHON} -V", "cwd": "", "env": "NOT-A-NAME=1"}, "--env 'NOT-A-NAME=1': expected NAME=VALUE"),
    ({"argv": "", "env": ""}, "no command: type one"),
]


@pytest.mark.slow
def test_a_command_that_cannot_run_shows_one_line_and_is_not_launched(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await _command_entry(pilot)
            for fields, error in REFUSED:
                await _set(pilot, screen, **fields)
                line = _shown(screen, "#command")
                assert line.startswith(error) and "\n" not in line, (fields, line)
                assert screen.config is None and screen.query_one("#launch", Button).disabled, fields
                if "env" not in fields:  # the line under the command line says it too
                    assert error in _shown(screen, "#cmd-argv-shown"), fields
                await pilot.press("ctrl+r")
                await pilot.pause(0.3)
                assert app.screen is screen, fields
            assert not list(tmp_path.iterdir())  # nothing ran, no record

    run(body())


@pytest.mark.slow
def test_launch_a_command_from_the_app_and_find_its_record(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = "import os; print(os.environ['GREETING'])"

    async def body():
        app = make_app(tmp_path / "runs")
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await _command_entry(pilot)
            await _set(pilot, screen, argv=f"{PYTHON} -c {shlex.quote(script)}", cwd=str(workdir), env="GREETING=hi")
            await pilot.press("ctrl+r")
            await until(pilot, lambda: isinstance(app.screen, LiveScreen), 10, "the live screen")
            live = app.screen
            assert live.config.workload == "command"
            await until(pilot, lambda: not live.is_live, 60, "the end of the command")
            await pilot.pause(0.3)
            assert live.status == "ok", live.feed.view().logs
            assert "no steps" in live.query_one(ThroughputPanel).text.plain
            assert any(text == "hi" for _, _, text in live.feed.view().logs)
            path = live.result.record_path

            await pilot.press("b")
            runs_screen = await open_runs(pilot)  # the runs list shows it: its command line as its options
            (row,) = runs_screen.rows.values()
            assert row.workload == "command" and row.status == "ok" and row.error is None
            assert row.options == f"{sys.executable} -c {shlex.quote(script)}"
            assert f"(in {workdir})" in row.all_options and "env GREETING=hi" in row.all_options
            await pilot.press("enter")  # the replay opens it
            assert isinstance(app.screen, ReplayScreen)
            replay = app.screen
            await pilot.press("e")
            await pilot.pause(0.3)
            assert replay.feed.summary is not None and replay.feed.steps_seen == 0
            assert any(text == "hi" for _, _, text in replay.feed.view().logs)
            assert "no steps" in replay.query_one(ThroughputPanel).text.plain
        return path

    rec = runs.load_record(run(body()))
    assert rec["status"] == "ok" and rec["config"]["workload"] == "command"
    assert rec["config"]["options"]["cwd"] == str(workdir) and rec["config"]["options"]["env"] == {"GREETING": "hi"}
    assert rec["output"]["stdout_tail"] == "hi\n"
    assert rec["summary"]["steps"]["total"] == 0


def _command_record(tmp_path) -> dict:
    """A finished command run's record as the runner writes it (no process started): no steps, an output block."""
    config = command_config(Command((sys.executable, "-c", "print('hi')", "--token", "s3cret"), cwd=str(tmp_path),
                                    env={"GREETING": "hi", "API_KEY": "k"}, parse="hf"))
    t0 = time.time()
    builder = RecordBuilder("20261130-150000-command-abcd", t0, config.as_record(), {"host": "test", "gpus": []})
    builder.add({"v": 1, "type": "log", "t": t0 + 0.1, "rank": -1, "stream": "stdout", "message": "hi",
                 "level": "stdout"})
    output = {"stdout_tail": "hi\n", "stderr_tail": "", "lines": {"stdout": 1, "stderr": 0},
              "lines_not_kept": {"stdout": 0, "stderr": 0}}
    rec = builder.finish("ok", 0, t0 + 0.2, None, {"events": 0, "bad_lines": 0, "connections": 0}, output)
    path = tmp_path / f"{rec['id']}.json"
    path.write_text(json.dumps(rec))
    return runs.load_record(path)


def test_a_command_run_is_named_by_its_redacted_command_line(tmp_path):
    rec = _command_record(tmp_path)
    line = shlex.join([sys.executable, "-c", "print('hi')", "--token", "<redacted>"])
    assert run_what(rec) == line
    assert run_what(rec, full=True) == f"{line}  (in {tmp_path})  env GREETING=hi API_KEY=<redacted>  --parse hf"
    (row,) = RunRow.load_all([tmp_path / f"{rec['id']}.json"])
    assert (row.workload, row.status, row.options, row.error) == ("command", "ok", line, None)
    assert row.all_options == run_what(rec, full=True) and row.tok_s is None
    assert [e["message"] for e in timeline(rec) if e["type"] == "log"] == ["hi"]  # what the replay feeds
    dense = {"config": {"workload": "dense", "options": {"preset": "tiny", "steps": 3}, "defaults": {"steps": 20}}}
    assert run_what(dense) == "preset=tiny steps=3"
