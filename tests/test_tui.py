"""The app driven by Textual's Pilot: real CPU runs launched, cancelled and quit; runs, replay, compare."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_tui_support import copy_runs, make_app, open_runs, recorded, run, until
from textual.widgets import Button, DataTable, Input, Select

from tuner import runs
from tuner.feed import RunFeed
from tuner.machine import MachineInfo
from tuner.tui.screens.base import TooSmall
from tuner.tui.screens.compare import CompareScreen
from tuner.tui.screens.dialogs import ConfirmScreen, HelpScreen
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.live import LiveScreen
from tuner.tui.screens.replay import ReplayScreen
from tuner.tui.screens.runs import RunsScreen
from tuner.tui.widgets.option_form import ChoiceSelect
from tuner.tui.widgets.throughput import ThroughputPanel

TINY = {"steps": 2, "warmup": 1}


async def _launch(pilot, options: dict) -> LiveScreen:
    screen = pilot.app.screen
    assert isinstance(screen, LaunchScreen)
    await until(pilot, lambda: screen.form is not None and screen.form.is_mounted, 10, "the form")
    for name, value in options.items():
        screen.set_option(name, value)
    await pilot.pause()
    await pilot.press("ctrl+r")
    await until(pilot, lambda: isinstance(pilot.app.screen, LiveScreen), 10, "the live screen")
    return pilot.app.screen  # type: ignore[return-value]


@pytest.mark.slow
def test_launch_a_tiny_cpu_run_to_the_end(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            live = await _launch(pilot, TINY)
            assert "--steps 2 --warmup 1" in live.config.command_line
            await until(pilot, lambda: not live.is_live, 90, "the end of the run")
            await pilot.pause(0.3)
            assert live.status == "ok", live.feed.view().logs
            assert live.result is not None and live.result.record_path.exists()
            assert live.feed.steps_seen == 3
            text = live.query_one(ThroughputPanel).text.plain
            assert "run " in text and "tok/s" in text
            await pilot.press("b")
            assert isinstance(app.screen, LaunchScreen)
        return live.result.record_path

    path = run(body())
    assert runs.load_record(path)["status"] == "ok"


@pytest.mark.slow
def test_cancel_a_run_and_quit_asks_while_live(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            live = await _launch(pilot, {"steps": 100000})
            await until(pilot, lambda: live._started, 60, "the run to start")
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            assert app.screen is live and live.is_live
            await pilot.press("b")  # disabled while live
            assert app.screen is live
            await pilot.press("c")
            await until(pilot, lambda: not live.is_live, 30, "the cancelled run's record")
            assert live.status == "cancelled"
            assert live.result is not None
            return live.result.record_path

    assert runs.load_record(run(body()))["status"] == "cancelled"


@pytest.mark.slow
def test_quit_while_live_cancels_and_waits_for_the_record(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            live = await _launch(pilot, {"steps": 100000})
            await pilot.press("q")
            await pilot.press("y")
            await until(pilot, lambda: not app.is_running or not live.is_live, 30, "the record")
            await pilot.pause(0.2)
        return app.return_code

    assert run(body()) == 0
    records = runs.list_runs(tmp_path)
    assert len(records) == 1 and runs.load_record(records[0])["status"] == "cancelled"
    assert not runs.orphan_journals(tmp_path)


@pytest.mark.slow
def test_app_ending_otherwise_cancels_the_live_run(tmp_path):
    """The app ending with a run live (a signal, a crash) cancels it; its record is written."""
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            live = await _launch(pilot, {"steps": 100000})
            await until(pilot, lambda: live._started, 60, "the run to start")
            app.exit()
        return app

    app = run(body())  # returns only once the runner's thread has ended
    assert app.live_runner is not None and app.live_runner.wait().status == "cancelled"
    assert runs.load_record(runs.list_runs(tmp_path)[0])["status"] == "cancelled"


@pytest.mark.slow
def test_form_follows_the_catalog_and_the_machine(tmp_path):
    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            await until(pilot, lambda: screen.form is not None and screen.form.is_mounted, 10)
            form = screen.form
            names = {o.dest for o in form.options}
            assert names == {o.dest for o in screen.spec.all_options()}
            device = screen.query_one("#opt-device", ChoiceSelect)
            assert "cuda" in device.unavailable and "NVML" in device.unavailable["cuda"]
            assert screen.query_one("#opt-preset", Select).value == screen.spec.cpu_preset
            command = screen.query_one("#command")
            await until(pilot, lambda: screen.ready, 10, "the config")
            assert str(command.render()).startswith("$ python -m workloads.dense --preset tiny")
            screen.set_option("mode", "prefill")
            await pilot.pause()
            assert screen.query_one("#opt-lr", Input).disabled
            assert "only with --mode train" in str(screen.query_one("#note-lr").render())
            screen.set_option("steps", "abc")
            await pilot.pause()
            assert screen.query_one("#launch", Button).disabled
            assert "not valid" in str(command.render())
            screen.set_option("steps", "7")
            await until(pilot, lambda: screen.ready and screen.config is not None, 10, "the config")
            assert screen.config.command_line.endswith("--steps 7 --mode prefill")
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("ctrl+p")
            await pilot.press(*"Runs")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, RunsScreen), 10, "the runs screen from the palette")

    run(body())


@pytest.mark.slow
def test_switching_workloads_rebuilds_the_form(tmp_path, monkeypatch):
    from dataclasses import replace

    from tuner import catalog
    from workloads.options import Option

    extra = replace(catalog.WORKLOADS["dense"], name="other", description="a second workload",
                    options=(Option("experts", int, 8, "experts per layer", min=1, group="shape"),))
    monkeypatch.setitem(catalog.WORKLOADS, "other", extra)

    async def body():
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            await until(pilot, lambda: screen.ready, 20)
            assert screen.query("#opt-mode")
            screen.select_workload("other")
            await until(pilot, lambda: screen.spec is extra and screen.ready, 20, "the other form")
            assert screen.query("#opt-experts") and not screen.query("#opt-mode")
            await pilot.press("home")  # the list has the focus: back to the first workload
            await until(pilot, lambda: screen.spec.name == "dense" and screen.ready, 20, "the dense form")
            assert screen.query("#opt-mode")

    run(body())


@pytest.mark.slow
def test_a_run_over_the_gpu_is_refused_in_the_form_and_ctrl_f_launches_it_anyway(tmp_path):
    """On a machine with an 80 GB GPU, llama-3.1-8b at batch 64 x 8192 tokens is refused with its estimate and the
    way out; Ctrl+F builds it with force and hands it to the app's launch. The launch itself is recorded, not
    run: this machine has no GPU to run it on."""
    from workloads.options import Machine

    h100 = MachineInfo(Machine(({"index": 0, "name": "NVIDIA H100 80GB HBM3", "mem_total_mb": 81559.0,
                                 "compute_capability": "9.0"},)))

    async def body():
        app = make_app(tmp_path, machine=h100)
        launched = []
        app.launch = launched.append  # the GPU run this machine cannot start
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.screen
            await until(pilot, lambda: screen.form is not None and screen.form.is_mounted, 10, "the form")
            await pilot.press("ctrl+f")
            await pilot.pause()
            assert not launched, "nothing to force yet"
            for name, value in (("preset", "llama-3.1-8b"), ("batch_size", "64"), ("seq_len", "8192")):
                screen.set_option(name, value)
            await until(pilot, lambda: screen.ready, 20, "the refusal")
            line = str(screen.query_one("#command").render())
            assert screen.config is None and "predicted not to fit" in line and "Ctrl+F" in line, line
            await pilot.press("ctrl+r")
            await pilot.pause()
            assert not launched, "Ctrl+R launches nothing the estimate refuses"
            await pilot.press("ctrl+f")
            await until(pilot, lambda: bool(launched), 20, "the forced launch")
            assert launched[0].options["batch_size"] == 64 and launched[0].options["seq_len"] == 8192

    run(body())


@pytest.mark.slow
def test_choices_this_machine_cannot_run_come_from_the_catalog_checks(tmp_path):
    from workloads.options import Machine

    h100 = MachineInfo(Machine(({"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},)))

    async def unavailable(machine: MachineInfo) -> dict[str, dict]:
        app = make_app(tmp_path, machine=machine)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            await until(pilot, lambda: screen.form is not None and screen.form.is_mounted, 10)
            choices = {select.opt.dest: select.unavailable for select in screen.query(ChoiceSelect)}
            return choices, str(screen.query_one("#machine").render())

    cpu, cpu_line = run(unavailable(make_app(tmp_path).machine))
    assert "cuda" in cpu["device"] and "NVML" in cpu["device"]["cuda"]
    assert set(cpu["fp8_mode"]) == {"te", "torchao"}
    assert {"cudnn", "efficient"} <= set(cpu["attention_backend"])
    assert "CPU-sized defaults" in cpu_line
    gpu, gpu_line = run(unavailable(h100))
    assert gpu["device"] == {} and {"cudnn", "efficient"}.isdisjoint(gpu["attention_backend"])
    assert "not installed" in gpu["fp8_mode"]["te"]  # transformer-engine is not installed here
    assert "1 × NVIDIA H100 80GB HBM3" in gpu_line


@pytest.mark.slow
def test_runs_screen_replay_and_compare(tmp_path):
    directory = copy_runs(tmp_path / "runs")

    async def body():
        app = make_app(directory)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_runs(pilot)
            table = screen.query_one(DataTable)
            assert table.row_count == len(list(directory.glob("*.json")))
            bad = [r for r in screen.rows.values() if r.error]
            assert len(bad) == 1 and "truncated" in bad[0].error
            await pilot.press("s", "o")  # sort by workload, reversed
            assert screen.sort_column == "workload"
            assert table.get_row_at(0)[2] == "tp-validate"
            dense = next(k for k, r in screen.rows.items() if r.workload == "dense" and r.status == "ok")
            table.move_cursor(row=table.get_row_index(dense))
            await pilot.press("enter")
            assert isinstance(app.screen, ReplayScreen)
            replay = app.screen
            await pilot.press("space")
            assert not replay.playing
            seen = replay.feed.steps_seen
            await pilot.press("n")
            assert replay.feed.steps_seen == seen + 1 and not replay.playing
            await pilot.press("plus", "plus", "minus")
            assert replay.speed == 2.0
            await pilot.press("e")
            assert replay.pos == len(replay.events) and replay.feed.summary is not None
            await pilot.press("r")
            assert replay.pos == 0 and replay.feed.summary is None
            await pilot.press("b")
            assert app.screen is screen
            ok = [k for k, r in screen.rows.items() if r.status == "ok" and r.workload == "dense"]
            screen.marked = ok[:2]
            await pilot.press("c")
            assert isinstance(app.screen, CompareScreen)
            compare = app.screen
            cells = [str(c) for row in range(compare.query_one(DataTable).row_count)
                     for c in compare.query_one(DataTable).get_row_at(row)]
            assert any("real" in c or "noise" in c or "too few" in c for c in cells)
            assert any("%)" in c for c in cells)

    run(body())


def test_too_small_terminal_shows_a_message(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(50, 12)) as pilot:
            await pilot.pause()
            assert app.screen.query_one(TooSmall).display
            await pilot.resize_terminal(80, 24)
            await pilot.pause()
            assert not app.screen.query_one(TooSmall).display

    run(body())


def test_feed_files_events_from_many_threads():
    feed = RunFeed(requests=1000)

    def send(rank: int) -> None:
        for i in range(2000):
            feed({"type": "request", "t": float(i), "rank": rank, "ttft_ms": 1.0, "tpot_ms": 2.0, "e2e_ms": 3.0})
            feed({"type": "log", "t": float(i), "rank": -1, "stream": "stderr", "message": f"{rank} {i}"})

    threads = [threading.Thread(target=send, args=(r,)) for r in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    view = feed.view()
    assert view.received == 16000 and view.requests_seen == 8000 and len(view.requests) == 1000
    assert view.log_seq == 8000 and len(view.logs) == 300


def test_feed_merges_ranks_of_a_step_and_counts_tokens_once():
    feed = RunFeed(history=50)
    for i in range(200):  # four tensor-parallel ranks, up to three steps apart
        for rank in range(4):
            step = i - rank % 3
            if step >= 0:
                feed({"type": "step", "t": float(i), "rank": rank, "step": step, "step_ms": 10.0 + rank,
                      "tokens": 100})
    view = feed.view()
    assert view.steps_seen == 200 and view.tokens_total == 20000
    assert len(view.steps) == 50 and all(s["step_ms"] == 13.0 for s in view.steps[:-2])  # the slowest rank


@pytest.mark.slow
def test_replay_shows_expert_balance_and_latency_only_when_the_record_has_them():
    async def shown(rec: dict) -> dict[str, bool]:
        app = make_app(Path("."))
        async with app.run_test(size=(100, 40)) as pilot:
            await app.push_screen(ReplayScreen(rec, autoplay=False, at_end=True))
            await pilot.pause()
            return {name: app.screen.query_one(f"#{name}").display for name in ("experts", "latency", "power")}

    assert run(shown(recorded("moe"))) == {"experts": True, "latency": False, "power": False}
    assert run(shown(recorded("synthetic"))) == {"experts": False, "latency": True, "power": False}


TMUX = shutil.which("tmux")


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_real_btune_tui_in_tmux_launch_to_finished_run(tmp_path):
    """The installed btune-tui in a 100×30 tmux pane: set --steps from the palette, launch, watch the phase line
    (measuring with its progress bar, then done), wait for OK; the record's phases run building → measuring."""
    exe = Path(sys.executable).with_name("btune-tui")
    runs_dir = tmp_path / "runs"
    tmux = [TMUX, "-L", f"btune-test-{os.getpid()}"]
    # COLUMNS/LINES (set in a pytest process) would override the pane's real size: drop them.
    command = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", f"BTUNE_RUNS_DIR={runs_dir}", str(exe),
                          "--refresh", "8"])
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True,
                              env=env).stdout

    def wait_for(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = pane()
            if text in screen:
                return screen
            time.sleep(0.25)
        raise AssertionError(f"{text!r} never appeared; the pane shows:\n{pane()}")

    def keys(*args: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "tui", *args], check=True, env=env)

    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", "-s", "tui", "-c", str(tmp_path), command],
                   check=True, env=env)
    try:
        screen = wait_for("-m workloads.dense --preset tiny", 30)
        assert max(len(line) for line in screen.splitlines()) > 80, screen  # drawn at the pane's 100 columns
        keys("C-p")
        wait_for("🔎", 15)
        keys("-l", "--", "--steps")
        wait_for("Set --steps", 15)
        keys("Enter")
        wait_for("--steps  measured steps", 15)  # the field's own help line: the steps field has the focus
        assert "🔎" not in pane()
        keys("-l", "40")
        wait_for("--steps 40", 20)
        keys("C-r")
        wait_for("RUNNING", 30)
        wait_for("measuring [", 120)  # the phase line with its progress bar while the steps run
        screen = wait_for(" OK ", 120)
        assert "record:" in screen and " done " in screen
        files = list(runs_dir.glob("*.json"))
        rec = runs.load_record(files[0])
        assert len(files) == 1 and rec["status"] == "ok"
        phases = [e["phase"] for e in rec["events"] if e["type"] == "phase"]
        assert phases[0] == "building" and phases[-1] == "measuring" and "warm-up" in phases, phases
        keys("q")
        deadline = time.monotonic() + 10
        while subprocess.run([*tmux, "has-session", "-t", "tui"], capture_output=True, env=env).returncode == 0:
            assert time.monotonic() < deadline, "btune-tui did not quit on q"
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, env=env)


def test_colour_options_and_refresh_rate(tmp_path, monkeypatch):
    from tuner.tui import app as app_module
    from tuner.tui.main import main as tui_main

    seen = {}
    monkeypatch.setattr(app_module.BtuneApp, "run", lambda self: seen.update(no_color=self.no_color))
    monkeypatch.setenv("NO_COLOR", "")  # recorded, so the teardown removes what run_app sets
    monkeypatch.delenv("NO_COLOR")
    assert tui_main(["--out", str(tmp_path)]) == 0 and seen["no_color"] is False
    assert tui_main(["--out", str(tmp_path), "--no-color"]) == 0 and seen["no_color"] is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert tui_main(["--out", str(tmp_path)]) == 0 and seen["no_color"] is True
    assert tui_main(["--refresh", "0"]) == 2
