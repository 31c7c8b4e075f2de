"""Dashboard: every live panel in a scrollable grid, redrawn together from one FeedView."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll

from tuner.feed import FeedView
from tuner.tui.widgets.experts import ExpertsPanel
from tuner.tui.widgets.gpu import GpuPanel
from tuner.tui.widgets.latency import LatencyPanel
from tuner.tui.widgets.log import LogPanel
from tuner.tui.widgets.memory import MemoryPanel
from tuner.tui.widgets.panel import Panel
from tuner.tui.widgets.power import PowerPanel
from tuner.tui.widgets.throughput import ThroughputPanel


class Dashboard(VerticalScroll):
    """The panels of a run (live or replayed); keyboard-scrollable when they do not fit."""

    def compose(self) -> ComposeResult:
        with Grid(id="panels"):
            yield ThroughputPanel(id="throughput", classes="panel")
            yield PowerPanel(id="power", classes="panel")
            yield MemoryPanel(id="memory", classes="panel")
            yield GpuPanel(id="gpu", classes="panel")
            yield ExpertsPanel(id="experts", classes="panel")
            yield LatencyPanel(id="latency", classes="panel")
        yield LogPanel(id="log")

    def show(self, view: FeedView, charts: bool = True) -> None:
        """Redraw every panel from ``view``; with ``charts`` False only the log moves."""
        if charts:
            for panel in self.query(Panel):
                panel.show(view)
        for log in self.query(LogPanel):
            log.show(view)
