"""Runs screen: the runs directory as a sortable table; Enter replays a run, marked runs are compared.

Files are read in a thread worker. A file that does not load shows its one-line error in its row. The options
column shows the options that differ between runs of a workload (tuner.report.differing_options) and wraps
rather than cuts; below 100 columns the time and energy columns are left out (the title says so, and the line
under the table shows the time of the run under the cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable, Footer, Static

from tuner import runs
from tuner.command import WORKLOAD as COMMAND
from tuner.report import differing_options, dig, fmt
from tuner.tui.screens.base import BtuneScreen
from tuner.tui.widgets.status import STATUS_STYLES, run_what

if TYPE_CHECKING:
    from tuner.tui.app import BtuneApp

COLUMNS = (("mark", " "), ("time", "time (UTC)"), ("workload", "workload"), ("status", "status"),
           ("tok_s", "tok/s"), ("mfu", "MFU"), ("energy", "energy J"), ("options", "options that differ / error"))
#: Fixed widths (the options column takes the rest): the table looks the same however fast it fills.
WIDTHS = {"mark": 1, "time": 16, "workload": 11, "status": 11, "tok_s": 9, "mfu": 6, "energy": 8}
NARROW = 100  #: below this width the time and energy columns are left out
NARROW_LEFT_OUT = ("time", "energy")


def columns_for(width: int) -> list[tuple[str, str, int | None]]:
    """(key, label, width) of the columns at a terminal ``width``; the options column takes what is left."""
    keys = [(k, label) for k, label in COLUMNS if not (width < NARROW and k in NARROW_LEFT_OUT)]
    fixed = sum(WIDTHS[k] for k, _ in keys if k != "options") + 2 * len(keys) + 2  # cell padding, scrollbar
    return [(k, label, WIDTHS.get(k, max(16, width - fixed))) for k, label in keys]
SORTABLE = ("time", "workload", "status", "tok_s", "mfu", "energy")
NUMERIC = frozenset({"tok_s", "mfu", "energy"})


def _time_of(run_id: str) -> str:
    """``YYYY-MM-DD HH:MM`` from an id that starts with the run's UTC stamp, else a dash."""
    stamp = run_id[:15]
    if len(stamp) == 15 and stamp[8] == "-" and (stamp[:8] + stamp[9:]).isdigit():
        return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}"
    return "-"


@dataclass
class RunRow:
    """One line of the table: a run file's headline figures, or why it cannot be read."""

    key: str
    path: Path
    time: str
    workload: str = "-"
    options: str = ""
    status: str = "-"
    tok_s: float | None = None
    mfu: float | None = None
    energy: float | None = None
    error: str | None = None

    all_options: str = ""  #: every option set away from its default (the line under the table)

    @classmethod
    def load(cls, path: Path) -> RunRow:
        return cls.load_all([path])[0]

    @classmethod
    def load_all(cls, paths: list[Path]) -> list[RunRow]:
        """A row for each run file; the options column holds what differs between runs of the same workload."""
        loaded: list[tuple[Path, dict[str, Any] | None, str | None]] = []
        for path in paths:
            try:
                loaded.append((path, runs.load_record(path), None))
            except runs.RunFileError as exc:
                loaded.append((path, None, str(exc)))
        good = [rec for _, rec, _ in loaded if rec is not None]
        differing = dict(zip((id(r) for r in good), differing_options(good), strict=True))
        out = []
        for path, rec, error in loaded:
            if rec is None:
                out.append(cls(str(path), path, _time_of(path.stem), status="unreadable", error=error))
                continue
            s = rec["summary"]
            started = str(rec.get("started") or "")
            when = started[:16].replace("T", " ") if started else _time_of(str(rec.get("id")))
            workload = str(dig(rec, ("config", "workload")))
            options = run_what(rec) if workload == COMMAND else differing[id(rec)]  # a command: its command line
            out.append(cls(str(path), path, when, workload, options or "-", str(rec["status"]),
                           s.get("throughput_tokens_per_s"), dig(s, ("mfu", "bf16", "value")), s.get("energy_j"),
                           all_options=run_what(rec, full=True) or "-"))
        return out

    @classmethod
    def journal(cls, path: Path) -> RunRow:
        run_id = path.name[: -len(runs.JOURNAL_SUFFIX)]
        if runs.is_live(path):
            return cls(str(path), path, _time_of(run_id), status="live",
                       error=f"{path.name}: a console is running it")
        return cls(str(path), path, _time_of(run_id), status="interrupted",
                   error=f"{path.name}: its console stopped before the record (btune runs recover)")

    def cells(self, marked: bool, keys: list[str] | None = None) -> list[Any]:
        """The row's cells for the columns ``keys`` (default: every column)."""
        status = Text(self.status, style=STATUS_STYLES.get(self.status, "bold red"))
        options = (Text(self.error.split(": ", 1)[-1], style="red", no_wrap=True, overflow="ellipsis") if self.error
                   else Text(self.options))
        cells = {"mark": Text("●", style="bold yellow") if marked else " ", "time": self.time,
                 "workload": self.workload, "status": status, "tok_s": Text(fmt(self.tok_s), justify="right"),
                 "mfu": Text(fmt(self.mfu, "%"), justify="right"), "energy": Text(fmt(self.energy), justify="right"),
                 "options": options}
        return [cells[k] for k in (keys or [k for k, _ in COLUMNS])]

    def sort_key(self, column: str) -> tuple[int, Any]:
        value = getattr(self, column)
        if column in NUMERIC:
            return (0, value) if isinstance(value, (int, float)) else (1, 0.0)
        return (0, str(value))


class RunsLoaded(Message):
    """The runs directory was read (from a thread worker)."""

    def __init__(self, rows: list[RunRow]) -> None:
        super().__init__()
        self.rows = rows


class RunsScreen(BtuneScreen):
    """Past runs; Enter replays, Space/m marks and moves down, c compares the marked runs."""

    HELP = ("Every run file in the runs directory, newest first. Up/down move, Enter replays the run under the "
            "cursor, Space or m marks (or unmarks) it and moves the cursor to the next row, c compares the marked "
            "runs (the first marked is the baseline), s changes the sort column and o reverses it, r reloads. The "
            "options column shows the options that differ between runs of the same workload (a workload with one "
            "run: those set away from the defaults); the line under the table shows every option of the run under "
            "the cursor. A file that cannot be read shows its error in its row.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "replay", "Replay", priority=True),  # priority: shown in the footer over the table's own
        Binding("space,m", "mark", "Mark & next"),
        Binding("c", "compare", "Compare"),
        Binding("s", "sort", "Sort"),
        Binding("o", "reverse", "Reverse"),
        Binding("r", "reload", "Reload"),
        Binding("escape,b", "back", "Back"),
    ]

    app: BtuneApp  # type: ignore[assignment]

    def __init__(self, runs_dir: Path) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.rows: dict[str, RunRow] = {}
        self.marked: list[str] = []
        self.sort_column = "time"
        self.sort_reverse = True
        self.columns: list[tuple[str, str, int | None]] = []

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("runs", "bold"), f" in {self.runs_dir}  (loading…)"), id="runs-title")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="run-detail")
        yield Footer()

    def on_mount(self) -> None:
        self._set_columns(self.app.size.width)
        self.action_reload()

    def on_resize(self) -> None:
        if columns_for(self.app.size.width) != self.columns:
            self._set_columns(self.app.size.width)
            self._fill()
            if self.rows:
                self._title()

    def _set_columns(self, width: int) -> None:
        """The table's columns for a terminal ``width`` (the rows are filled again by the caller)."""
        self.columns = columns_for(width)
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for key, label, w in self.columns:
            table.add_column(label, key=key, width=w)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _load(self) -> None:
        paths = runs.list_runs(self.runs_dir)
        rows = RunRow.load_all(paths) + [RunRow.journal(j) for j in runs.orphan_journals(self.runs_dir)]
        self.post_message(RunsLoaded(rows))

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self.rows = {r.key: r for r in message.rows}
        self.marked = [k for k in self.marked if k in self.rows]
        self._title()
        self._fill()

    def _title(self) -> None:
        bad = sum(1 for r in self.rows.values() if r.error)
        note = f"  {len(self.rows)} runs" + (f", {bad} unreadable" if bad else "")
        shown = [k for k, _, _ in self.columns]
        if any(k not in shown for k in NARROW_LEFT_OUT):
            note += f"  (time, energy: {NARROW}+ columns)"
        self.query_one("#runs-title", Static).update(Text.assemble(("runs", "bold"), f" in {self.runs_dir}{note}"))

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        current = self._current_key()
        table.clear()
        order = sorted(self.rows.values(), key=lambda r: r.sort_key(self.sort_column), reverse=self.sort_reverse)
        if self.sort_column in NUMERIC:  # runs without the figure stay last either way
            order = [r for r in order if getattr(r, self.sort_column) is not None] + \
                    [r for r in order if getattr(r, self.sort_column) is None]
        keys = [k for k, _, _ in self.columns]
        for row in order:
            table.add_row(*row.cells(row.key in self.marked, keys), key=row.key, height=None)
        if current in self.rows:
            table.move_cursor(row=table.get_row_index(current))
        self._show_detail()

    def _current_key(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:
            return None

    @on(DataTable.RowHighlighted)
    def _show_detail(self) -> None:
        key = self._current_key()
        row = self.rows.get(key or "")
        detail = self.query_one("#run-detail", Static)
        if row is None:
            detail.update(Text("no runs yet: launch one (Esc, then Ctrl+R)", style="dim") if not self.rows else "")
            return
        marks = f"  [{len(self.marked)} marked]" if self.marked else ""
        when = f"{row.time} UTC  " if "time" not in [k for k, _, _ in self.columns] else ""
        text = Text(row.error, style="red") if row.error else Text(f"{when}{row.path.name}  {row.all_options}{marks}")
        detail.update(text)

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        self.replay(str(event.row_key.value))

    def action_replay(self) -> None:
        """Replay the run under the cursor."""
        key = self._current_key()
        if key is not None:
            self.replay(key)

    def replay(self, key: str) -> None:
        """Open the run ``key`` on the replay screen (a row that cannot be read says why)."""
        row = self.rows.get(key)
        if row is None:
            return
        if row.error:
            self.notify(row.error, severity="error")
            return
        try:
            rec = runs.load_record(row.path)
        except runs.RunFileError as exc:
            self.notify(str(exc), severity="error")
            return
        from tuner.tui.screens.replay import ReplayScreen

        self.app.push_screen(ReplayScreen(rec, self.app.refresh_hz))

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column in SORTABLE:
            self.sort_reverse = not self.sort_reverse if column == self.sort_column else column in NUMERIC
            self.sort_column = column
            self._fill()

    def action_mark(self) -> None:
        key = self._current_key()
        if key is None:
            return
        if key in self.marked:
            self.marked.remove(key)
        else:
            self.marked.append(key)
        table = self.query_one(DataTable)
        table.update_cell(key, "mark", Text("●", style="bold yellow") if key in self.marked else " ")
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)
        self._show_detail()

    def action_compare(self) -> None:
        if len(self.marked) < 2:
            self.notify("mark two or more runs first (Space or m)", severity="warning")
            return
        records = []
        for key in self.marked:
            row = self.rows[key]
            try:
                records.append(runs.load_record(row.path))
            except runs.RunFileError as exc:
                self.notify(str(exc), severity="error")
                return
        from tuner.tui.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(records))

    def action_sort(self) -> None:
        i = SORTABLE.index(self.sort_column) if self.sort_column in SORTABLE else -1
        self.sort_column = SORTABLE[(i + 1) % len(SORTABLE)]
        self.sort_reverse = self.sort_column in NUMERIC or self.sort_column == "time"
        self._fill()
        self.notify(f"sorted by {dict(COLUMNS)[self.sort_column]}", timeout=2)

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._fill()

    def action_reload(self) -> None:
        self._load()

    def action_back(self) -> None:
        self.app.pop_screen()
