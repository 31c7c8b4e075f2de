"""btune-tui: the Textual app. Global bindings only; the screens do the work.

``run_app`` is what ``btune-tui`` calls (tuner.tui.main). NO_COLOR and ``--no-color`` give a monochrome app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from tuner.launch import RunConfig
from tuner.machine import MachineInfo
from tuner.runner import Runner
from tuner.tui.screens.base import BtuneScreen
from tuner.tui.screens.commands import ScreenCommands, described_bindings
from tuner.tui.screens.dialogs import ConfirmScreen, HelpScreen, bindings_text
from tuner.tui.screens.launch import LaunchScreen
from tuner.tui.screens.live import LiveScreen
from tuner.tui.screens.runs import RunsScreen

MAX_REFRESH_HZ = 60.0


class AppError(Exception):
    """The app cannot start as asked (one line; ``btune-tui`` prints it and exits 2)."""


class BtuneApp(App[int]):
    """Launch, watch, replay and compare runs."""

    CSS_PATH = "app.tcss"
    TITLE = "btune"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark,f1", "help", "Help"),
    ]
    COMMANDS = App.COMMANDS | {ScreenCommands}

    def __init__(self, runs_dir: Path, refresh_hz: float = 4.0, *, machine: MachineInfo | None = None,
                 python: str | None = None, telemetry: bool = True, nvml: Any = None) -> None:
        """``machine`` skips GPU detection and ``python`` sets the interpreter in the argv (tests)."""
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.refresh_hz = refresh_hz
        self.metrics: Any = None  #: a live Prometheus endpoint (tuner.prom.MetricsServer) live screens report to
        self.machine = machine
        self.python = python
        self.telemetry = telemetry
        self.nvml = nvml
        self.live_runner: Runner | None = None  # the run a live screen started and has not seen end
        self.tune_process: Any = None  #: the btune tune the Tune screen started (tuner.tui.screens.tune.TuneProcess)

    def get_default_screen(self) -> Screen[Any]:
        return LaunchScreen()

    def on_mount(self) -> None:
        """SIGTERM and SIGHUP (an SSH session dropped) end the app cleanly: a live run is cancelled and
        its record written before the process exits."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.exit)

    # -- navigation ----------------------------------------------------------------------------
    def live_screen(self) -> LiveScreen | None:
        """The live screen whose run has not ended, if any."""
        return next((s for s in self.screen_stack if isinstance(s, LiveScreen) and s.is_live), None)

    def launch(self, config: RunConfig) -> None:
        """Start ``config`` on a new live screen (one live run at a time); a dry run shows its plan instead (no
        run, no record)."""
        if config.options.get("dry_run"):
            from tuner.tui.screens.plan import PlanScreen

            self.push_screen(PlanScreen(config))
            return
        if self.live_screen() is not None:
            self.notify("a run is already live", severity="warning")
            return
        self.push_screen(LiveScreen(config, self.runs_dir, self.refresh_hz, self.telemetry, self.nvml))

    def action_runs(self) -> None:
        """Show the runs directory."""
        self.push_screen(RunsScreen(self.runs_dir))

    def action_history(self) -> None:
        """Show btune bench's history (RUNS_DIR/bench-history.sqlite)."""
        from tuner.tui.screens.history import HistoryScreen

        self.push_screen(HistoryScreen(self.runs_dir))

    def action_tune(self) -> None:
        """Show btune tune's studies; start, follow and stop a tune."""
        from tuner.tui.screens.tune import TuneScreen

        self.push_screen(TuneScreen(self.runs_dir))

    def action_help(self) -> None:
        """Help for the current screen."""
        screen = self.screen
        if isinstance(screen, HelpScreen):
            return
        text = screen.HELP if isinstance(screen, BtuneScreen) else ""
        self.push_screen(HelpScreen(f"btune · {type(screen).__name__.removesuffix('Screen').lower()}", text,
                                    bindings_text(screen)))

    async def action_quit(self) -> None:
        """Quit; while a run is live, ask first, then cancel it and wait for its record."""
        live = self.live_screen()
        if live is None:
            self.exit(0)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                live.cancel_and_quit()
                self.notify("cancelling the run; btune quits when its record is written")

        self.push_screen(ConfirmScreen(partial(quit_question, live)), answer)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Textual's system commands, less those the palette already lists from a key binding (Quit)."""
        listed = {b.description for owner in (screen, self) for b in described_bindings(owner)}
        for command in super().get_system_commands(screen):
            if command.title not in listed:
                yield command


def quit_question(live: LiveScreen) -> str:
    """The quit dialog's question, as things are now: a run that ended while the dialog is open is not live."""
    if not live.is_live:
        return "The run has ended and its record is written. Quit?"
    proc = live.runner.proc if live.runner is not None else None
    if proc is not None and proc.returncode is not None:
        return "The run has ended; its record is being written. Quit once it is?"
    return "A run is live. Cancel it and quit? (its record is kept)"


def stop_tune(tune: Any, timeout: float = 60.0) -> None:
    """A tune the app started and that still runs is interrupted with the app (its study is kept: btune tune
    --resume continues it); waits up to ``timeout`` s for it to mark the study, then kills it."""
    if tune is None or not tune.stop():
        return
    import subprocess

    try:
        tune.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tune.proc.kill()
        tune.proc.wait()
    print(f"btune-tui: the tune was interrupted with the app (exit status {tune.proc.returncode}); "
          f"btune tune --resume {tune.study_id or 'STUDY'} continues it", file=sys.stderr)


def run_app(runs_dir: Path, refresh_hz: float = 4.0, no_color: bool = False, metrics: Any = None) -> int:
    """Run the app in the terminal until it quits; returns the exit status. AppError: a bad ``refresh_hz``.
    ``metrics``: a live Prometheus endpoint (tuner.prom.MetricsServer) that serves the run being watched."""
    if not 0 < refresh_hz <= MAX_REFRESH_HZ:
        raise AppError(f"btune-tui: --refresh {refresh_hz:g}: expected a number in (0, {MAX_REFRESH_HZ:g}]")
    if no_color:
        os.environ["NO_COLOR"] = "1"  # Textual reads it when the app is created
    app = BtuneApp(runs_dir, refresh_hz)
    app.metrics = metrics
    app.run()
    runner = app.live_runner
    if runner is not None:  # the app ended some other way (a signal, a crash): the live screen cancelled it
        runner.cancel()
        result = runner.wait()
        print(f"btune-tui: the live run was stopped with the app: {result.status}, {result.record_path}",
              file=sys.stderr)
    stop_tune(app.tune_process)
    return int(app.return_code or 0)
