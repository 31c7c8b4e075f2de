"""Dashboard: every live panel in a scrollable grid above the run's log, redrawn together from one FeedView.

The log sits under the grid, outside its scrolling: a few lines while it has only notes, more once the
program writes or fails. Many GPUs fold into one line per panel until ``gpu_rows`` is set; on a short
screen the panels keep to their figures (``compact``).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, Vertical, VerticalScroll

from tuner.feed import FeedView
from tuner.tui.widgets.experts import ExpertsPanel
from tuner.tui.widgets.gpu import GpuPanel
from tuner.tui.widgets.latency import LatencyPanel
from tuner.tui.widgets.log import LogPanel
from tuner.tui.widgets.memory import MemoryPanel
from tuner.tui.widgets.panel import Panel
from tuner.tui.widgets.power import PowerPanel
from tuner.tui.widgets.throughput import ThroughputPanel
from tuner.tui.widgets.validation import ValidationPanel

#: From this many rows the screen is tall: charts at full height, panels with their history.
TALL = 34
#: The height classes of the screens that show a dashboard (app.tcss sizes the charts by them).
HEIGHT_BREAKPOINTS = [(0, "-tiny-h"), (16, "-short"), (TALL, "-tall"), (50, "-huge")]


class Dashboard(Vertical):
    """The panels of a run (live or replayed), keyboard-scrollable when they do not fit, and its log."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="panels-scroll"), Grid(id="panels"):
            yield ThroughputPanel(id="throughput", classes="panel")
            yield ValidationPanel(id="validation", classes="panel")
            yield PowerPanel(id="power", classes="panel")
            yield MemoryPanel(id="memory", classes="panel")
            yield GpuPanel(id="gpu", classes="panel")  # beside memory; with GPUs it moves to the end
            yield LatencyPanel(id="latency", classes="panel")
            yield ExpertsPanel(id="experts", classes="panel")
        yield LogPanel(id="log")

    def show(self, view: FeedView, charts: bool = True, gpu_rows: bool = False) -> None:
        """Redraw every panel from ``view`` (each only if what it draws changed); with ``charts`` False only the
        log moves. ``gpu_rows``: a row per GPU however many there are."""
        compact = self.screen.size.height < TALL
        self.set_class(view.experts_seen > 0 or view.requests_seen > 0, "-busy")  # short: no power/memory chart
        if bool(view.gpus) != self.has_class("-gpus"):  # util goes last (under power and memory), or back
            self.set_class(bool(view.gpus), "-gpus")
            grid = self.query_one("#panels", Grid)
            gpu = self.query_one(GpuPanel)
            grid.move_child(gpu, after=self.query_one(ExpertsPanel) if view.gpus else self.query_one(MemoryPanel))
        if charts:
            for panel in self.query(Panel):
                panel.gpu_rows, panel.compact = gpu_rows, compact
                panel.show(view)
        for log in self.query(LogPanel):
            log.show(view)
