"""History screen: ``btune bench``'s history, one (job, figure) at a time: a chart of the figure per round with
the change points marked, and the runs behind it; Enter on a run opens its record on the replay screen.

The history (RUNS_DIR/bench-history.sqlite) is read in a thread worker; the series and their change points
are tuner.bench.report.history_series's (the change-point rule of ``btune bench history``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Footer, Select, Static

from tuner import runs
from tuner.report import fmt
from tuner.tui.screens.base import BtuneScreen
from tuner.tui.widgets.chart import Marks, Series, XYChart

if TYPE_CHECKING:
    from tuner.bench.report import HistorySeries
    from tuner.tui.app import BtuneApp

HISTORY_FILE = "bench-history.sqlite"  #: in the runs directory, as ``btune bench`` writes it by default
COLUMNS = (("round", "round"), ("started", "started (UTC)"), ("commit", "commit"), ("value", "value"),
           ("run_id", "run id"))


class HistoryLoaded(Message):
    """The history was read (from a thread worker): its series, or why it could not be."""

    def __init__(self, series: list[HistorySeries], error: str | None = None) -> None:
        super().__init__()
        self.series = series
        self.error = error


class HistoryScreen(BtuneScreen):
    """``btune bench``'s history: pick a job and a figure; the chart per round, change points marked; the runs."""

    HELP = ("btune bench's history (RUNS_DIR/bench-history.sqlite): choose a job and a figure at the top (Tab moves "
            "between them); the chart shows the figure per round (the mean of the round's runs), rounds where the "
            "change-point rule finds a significant change marked with a red rule and ▲ (the line under the chart "
            "says which way); the table lists the runs behind it. Enter on a run opens its record on the replay "
            "screen, r reloads. Make a history with btune bench CONFIG.toml.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Reload"),
        Binding("escape,b", "back", "Back"),
    ]

    app: BtuneApp  # type: ignore[assignment]

    def __init__(self, runs_dir: Path, path: Path | None = None) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.path = path or runs_dir / HISTORY_FILE
        self.series: list[HistorySeries] = []
        self.current: HistorySeries | None = None
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("history", "bold"), f" {self.path}  (loading…)"), id="history-title")
        with Horizontal(id="history-picks"):
            yield Select[str]([], prompt="job", id="history-job", allow_blank=True, compact=True)
            yield Select[str]([], prompt="figure", id="history-metric", allow_blank=True, compact=True)
        yield XYChart("", y_from_zero=False, id="history-chart")
        yield Static("", id="history-changes")
        yield DataTable(id="history-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.action_reload()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _load(self) -> None:
        if not self.path.is_file():
            self.post_message(HistoryLoaded([], "none"))
            return
        from tuner.bench import BenchError
        from tuner.bench.history import History
        from tuner.bench.report import history_series

        try:
            history = History(self.path, busy_ms=2000)
            try:
                rows = history.rows()
            finally:
                history.close()
        except BenchError as exc:
            self.post_message(HistoryLoaded([], str(exc)))
            return
        self.post_message(HistoryLoaded(history_series(rows)))

    def on_history_loaded(self, message: HistoryLoaded) -> None:
        self.series = message.series
        self.loaded = True
        title = self.query_one("#history-title", Static)
        if message.error == "none":
            title.update(Text.assemble(("history", "bold"), f": no bench history at {self.path}. Make one with "
                                       "btune bench CONFIG.toml (see README, Continuous benchmarking)."))
        elif message.error:
            title.update(Text(message.error, style="red"))
        else:
            rounds = {r for s in self.series for r in s.rounds}
            title.update(Text.assemble(("history", "bold"), f" {self.path}  {len(rounds)} rounds, "
                                       f"{len(self.series)} series"))
        job_select = self.query_one("#history-job", Select)
        jobs = self.jobs()
        old = job_select.value
        job_select.set_options([(j, j) for j in jobs])
        if jobs:
            job_select.value = old if old in jobs else jobs[0]
        self._fill_metrics()

    def jobs(self) -> list[str]:
        return list(dict.fromkeys(s.job for s in self.series))

    def metrics(self, job: str) -> list[str]:
        return [s.metric for s in self.series if s.job == job]

    def _fill_metrics(self) -> None:
        job = self.query_one("#history-job", Select).value
        select = self.query_one("#history-metric", Select)
        names = self.metrics(job) if isinstance(job, str) else []
        old = select.value
        select.set_options([(m, m) for m in names])
        if names:
            select.value = old if old in names else names[0]
        self._show()

    @on(Select.Changed, "#history-job")
    def _job_changed(self) -> None:
        self._fill_metrics()

    @on(Select.Changed, "#history-metric")
    def _metric_changed(self) -> None:
        self._show()

    def _show(self) -> None:
        job = self.query_one("#history-job", Select).value
        metric = self.query_one("#history-metric", Select).value
        self.current = next((s for s in self.series if s.job == job and s.metric == metric), None)
        chart = self.query_one(XYChart)
        table = self.query_one(DataTable)
        changes = self.query_one("#history-changes", Static)
        table.clear()
        s = self.current
        if s is None:
            chart.set_data([])
            changes.update("")
            return
        chart.unit = s.unit
        xs = tuple(float(r) for r in s.rounds)
        cut = [(float(r), m) for r, m in zip(s.rounds, s.means, strict=True) if r in s.changes]
        chart.set_data([Series(xs, s.means, "green")],
                       [Marks(xs, s.means, "green", "●"),
                        Marks(tuple(x for x, _ in cut), tuple(y for _, y in cut), "bold red", "▲")],
                       rules=[(x, "red") for x, _ in cut],
                       legend=[(f"{s.job} {s.metric}" + (f" ({s.unit})" if s.unit else ""), "green"),
                               *([("▲ change", "red")] if cut else [])])
        changes.update(Text("  ".join(f.message for _, f in sorted(s.changes.items())) or
                            "no significant change over the history", style="red" if s.changes else "dim"))
        for i, row in enumerate(reversed(s.rows)):  # the latest round first
            table.add_row(str(row["round"]), row["started"], str(row.get("commit") or "-")[:12], fmt(row["value"]),
                          row.get("run_id") or "-", key=str(i))

    def run_ids(self) -> list[str | None]:
        """The table's run ids, top row first."""
        return [r.get("run_id") for r in reversed(self.current.rows)] if self.current else []

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        self.open_run(int(str(event.row_key.value)))

    def open_run(self, index: int) -> None:
        """Open the run of table row ``index`` on the replay screen (a run not in the runs directory says so)."""
        ids = self.run_ids()
        if not 0 <= index < len(ids):
            return
        run_id = ids[index]
        if not run_id:
            self.notify("this run has no record (it did not start)", severity="warning")
            return
        try:
            rec = runs.load_record(runs.resolve_run(run_id, self.runs_dir))
        except runs.RunFileError as exc:
            self.notify(str(exc), severity="error")
            return
        from tuner.tui.screens.replay import ReplayScreen

        self.app.push_screen(ReplayScreen(rec, self.app.refresh_hz))

    def action_reload(self) -> None:
        self._load()

    def action_back(self) -> None:
        self.app.pop_screen()
