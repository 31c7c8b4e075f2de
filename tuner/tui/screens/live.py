"""Live screen: one run, launched through the Runner, watched on the panels.

The runner's subscriber is a RunFeed (bounded buffers under a lock). ``Runner.start()`` and
``Runner.wait()`` run in a thread worker that posts RunFinished with the RunResult; the panels redraw
on a timer at the app's refresh rate. Nothing here waits on the runner.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Footer, Static

from tuner.feed import RunFeed
from tuner.launch import RunConfig, make_runner
from tuner.runner import Runner, RunResult
from tuner.tui.screens.base import BtuneScreen
from tuner.tui.widgets.dashboard import HEIGHT_BREAKPOINTS, Dashboard
from tuner.tui.widgets.status import StatusLine, run_what

if TYPE_CHECKING:
    from tuner.tui.app import BtuneApp


class RunFinished(Message):
    """The run ended and its record is written (``result``), or it could not start (``error``)."""

    def __init__(self, result: RunResult | None, error: str | None = None) -> None:
        super().__init__()
        self.result, self.error = result, error


class LiveScreen(BtuneScreen):
    """Panels of a running workload; c cancels, p pauses the charts."""

    HELP = ("The run's panels redraw a few times a second from buffers the runner fills, each only when its data "
            "changed. Throughput charts tokens/s and step time against the run's time beside the last step, the "
            "steady window's tokens/s, MFU and MBU; power and memory chart each GPU (no GPU: the host's memory); "
            "util/clocks/temp lists them. With more than 4 GPUs each panel folds them into one line (the charts: "
            "the mean and the highest GPU); g shows a row per GPU. Expert balance and latency appear when the "
            "workload sends them. The log under the panels keeps to a few lines until the program writes or fails. "
            "c cancels the run (its record is still written), p pauses the charts, b or Esc goes back once the run "
            "has ended. Arrows/PgUp/PgDn scroll.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "cancel_run", "Cancel run"),
        Binding("p", "pause", "Pause charts"),
        Binding("g", "gpu_rows", "GPUs"),
        Binding("escape,b", "back", "Back"),
    ]
    VERTICAL_BREAKPOINTS = HEIGHT_BREAKPOINTS

    app: BtuneApp  # type: ignore[assignment]

    def __init__(self, config: RunConfig, runs_dir: Path, refresh_hz: float = 4.0, telemetry: bool = True,
                 nvml: Any = None, runner: Runner | None = None) -> None:
        """``runner``: a Runner made by the caller for ``config`` (not started); by default one is made."""
        super().__init__()
        self.config, self.runs_dir, self.refresh_hz = config, runs_dir, refresh_hz
        self.telemetry, self.nvml = telemetry, nvml
        self.feed = RunFeed()
        self.runner: Runner | None = runner
        self.result: RunResult | None = None
        self.error: str | None = None
        self.status = "starting"
        self.paused = False
        self.gpu_rows = False
        self.quit_when_done = False
        self._t0 = time.monotonic()
        self._started = False
        self._drawn = -1

    @property
    def is_live(self) -> bool:
        """True until the run has ended and its record is written."""
        return self.result is None and self.error is None

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        yield Dashboard(id="dashboard")
        yield Static(f"$ {self.config.command_line}", id="command-line")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        try:
            if self.runner is None:
                self.runner = make_runner(self.config, self.runs_dir, telemetry=self.telemetry, nvml=self.nvml)
        except Exception as exc:  # runs directory not writable, bad argv: one line, no traceback
            self.error = str(exc)
            self.status = "failed"
            self.feed.add_line("error", f"cannot start: {exc}")
        else:
            assert self.runner is not None
            self.runner.subscribe(self.feed)
            metrics = getattr(self.app, "metrics", None)
            if metrics is not None:  # btune-tui --metrics-port: this run is the one served
                metrics.follow(self.runner, self.config, self.feed)
            self.app.live_runner = self.runner
            self._run(self.runner)
        self.set_interval(1.0 / max(0.1, self.refresh_hz), self.redraw)
        self.call_after_refresh(self.redraw)

    @work(thread=True, exit_on_error=False, name="runner")
    def _run(self, runner: Runner) -> None:
        """Start the run and wait for its end, off the UI thread."""
        try:
            runner.start()
            self._started = True
            result = runner.wait()
        except Exception as exc:
            self.post_message(RunFinished(None, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(RunFinished(result))

    def on_run_finished(self, message: RunFinished) -> None:
        self.result, self.error = message.result, message.error
        if self.app.live_runner is self.runner:
            self.app.live_runner = None
        if message.result is not None:
            self.status = message.result.status
            self.feed.finish(message.result.record.get("summary") or {})
            err = message.result.record.get("error") or {}
            if err.get("message"):
                self.feed.add_line("error", str(err["message"]))
            self.feed.add_line("note", f"record: {message.result.record_path}")
        else:
            self.status = "failed"
            self.feed.add_line("error", f"the runner failed: {message.error}")
        record = message.result.record_path if message.result is not None else "-"
        self.query_one("#command-line", Static).update(f"record: {record}\n$ {self.config.command_line}")
        self.refresh_bindings()
        self.redraw()
        if self.quit_when_done:
            self.app.exit(0)

    def on_unmount(self) -> None:
        """The app is ending with the run still live (a signal, a crash): cancel it, so the runner's
        thread can finish and write the record (Python waits for that thread before exiting)."""
        if self.runner is not None and self.is_live:
            self.runner.cancel()

    # -- drawing -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        if self.result is not None:
            duration = (self.result.record.get("summary") or {}).get("duration_s")
            if isinstance(duration, (int, float)):
                return float(duration)
        return time.monotonic() - self._t0

    def redraw(self) -> None:
        """Status line every tick; panels when the feed changed (and the charts are not paused)."""
        if self.status == "starting" and self._started:
            self.status = "running"
        run_id = self.runner.run_id if self.runner is not None else "-"
        phase = self.feed.progress().text(12) if self.is_live else "done"
        extra = f"{phase}  events {self.feed.received:,}" + ("  [charts paused]" if self.paused else "")
        what = f"{self.config.workload} {run_what({'config': self.config.as_record()})}"
        self.query_one(StatusLine).set_state(self.status, run_id, what, self.elapsed(), extra)
        if self.feed.version != self._drawn or self.paused:
            view = self.feed.view()
            self.query_one(Dashboard).show(view, charts=not self.paused, gpu_rows=self.gpu_rows)
            self._drawn = view.version

    def on_resize(self) -> None:
        self._drawn = -1
        self.call_after_refresh(self.redraw)

    # -- actions -------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Cancel only while the run is live; back only after it (shown greyed out otherwise)."""
        if action == "cancel_run":
            return True if self.is_live else None
        if action == "back":
            return None if self.is_live else True
        return True

    def action_cancel_run(self) -> None:
        """Ask the run to stop; its record is still written."""
        if self.runner is not None and self.is_live:
            self.runner.cancel()
            self.status = "cancelling"
            self.redraw()
        else:
            self.notify("the run has already ended")

    def action_pause(self) -> None:
        """Freeze (or unfreeze) the charts; the buffers keep filling."""
        self.paused = not self.paused
        self._drawn = -1
        self.redraw()

    def action_gpu_rows(self) -> None:
        """A row per GPU in every panel, or many GPUs folded into one line (the default above 4)."""
        self.gpu_rows = not self.gpu_rows
        self._drawn = -1
        self.redraw()

    def action_back(self) -> None:
        if self.is_live:
            self.notify("the run is live: press c to cancel it, or wait for the end", severity="warning")
            return
        self.app.pop_screen()

    def cancel_and_quit(self) -> None:
        """Cancel the run and exit the app once its record is written."""
        self.quit_when_done = True
        if self.runner is not None and self.is_live:
            self.runner.cancel()
            self.status = "cancelling"
            self.redraw()
        else:
            self.app.exit(0)
