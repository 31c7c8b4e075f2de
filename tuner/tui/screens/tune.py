"""Tune screen: ``btune tune``'s studies (in the bench history, RUNS_DIR/bench-history.sqlite), one at a time: its
trials as they arrive, a chart of every measured trial against its peak memory with the Pareto front marked, the
best setting and its command; a tune started from the launch form's workload, followed, stopped early.

The history is read in a thread worker, again every second while the study shown is running; the best, the front
and the runner-up are tuner.tune.report.summarize's (what ``btune tune --show`` prints). A tune runs as its own
process (``python -m tuner tune``, its output in RUNS_DIR/tune-TIME.log), so it keeps its study consistent whatever
the app does; ``s`` sends it SIGINT, which cancels the running trial and marks the study interrupted (``btune tune
--resume ID`` continues it). The process is the app's (BtuneApp.tune_process): leaving this screen does not stop it,
quitting the app does.
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Input, Select, Static

from tuner import catalog, runs
from tuner.report import fmt
from tuner.tui.screens.base import BtuneScreen, Command
from tuner.tui.screens.history import HISTORY_FILE
from tuner.tui.widgets.chart import Marks, XYChart

if TYPE_CHECKING:
    from tuner.tui.app import BtuneApp

MIB = 1024 * 1024
DEFAULT_BUDGET = "10"  #: trials (a plain number) or wall time (90s, 30m, 2h)
DEFAULT_TRIAL_SECONDS = "5"
#: Launch-form options a tune does not take: the tuner sets each trial's length; a dry run runs nothing.
NOT_FIXED = ("steps", "duration", "dry_run")
COLUMNS = (("number", "#"), ("phase", "phase"), ("rung", "rung"), ("setting", "setting"), ("state", "state"))


def _value_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _space_name(item: str) -> str:
    return item.partition("=")[0].strip().lstrip("-").replace("-", "_")


def default_space(workload: str, values: dict[str, Any]) -> str:
    """The knobs ``workload`` declares tunable that the form leaves at their defaults, as ``--space`` items
    (``batch_size=1,2,4,8,16 compile_mode=none,default``): what a tune searches unless narrowed."""
    from tuner.tune.space import declared

    spec = catalog.get(workload)
    return " ".join(f"{k}={','.join(_value_text(v) for v in vs)}" for k, vs in declared(spec).items()
                    if k not in values)


def tune_argv(runs_dir: Path, workload: str, values: dict[str, Any], budget: str, trial_seconds: str,
              space: str, python: str | None = None) -> list[str]:
    """``python -m tuner tune`` for the launch form's ``values`` (those that differ from the defaults; NOT_FIXED
    left out) as fixed options, over ``space`` (``NAME=VALUES`` items, space-separated). A knob the form sets
    and the space names is tuned, not fixed; a declared knob the space leaves out is fixed at the form's value
    (``--space NAME=V``), so the search is the space as given."""
    from tuner.tune.space import applies, declared

    spec = catalog.get(workload)
    items = space.split()
    named = {_space_name(i) for i in items}
    fixed = {k: v for k, v in values.items() if k not in NOT_FIXED and k not in named}
    current = {**spec.defaults(), **fixed}
    pinned = [f"{k}={_value_text(current[k])}" for k in declared(spec)
              if k not in named and k not in fixed and applies(spec, k, current)]
    argv = [python or sys.executable, "-m", "tuner", "tune", "--out", str(runs_dir), "--budget", budget,
            "--trial-seconds", trial_seconds]
    for item in (*items, *pinned):
        argv += ["--space", item]
    return [*argv, workload, *catalog.to_argv(spec, fixed)]


@dataclass
class TuneProcess:
    """A ``btune tune`` the app started: its process, its log, and the study it writes (the first one in the
    history with an id above ``after``, once it has made it)."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path
    after: int
    study_id: int | None = None
    stopping: bool = False
    reported: bool = False  #: the screen has said that it ended

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> bool:
        """SIGINT: the tuner cancels the running trial and marks the study interrupted. False when it had ended."""
        if not self.alive:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        self.stopping = True
        return True

    def last_line(self) -> str:
        """The log's last non-empty line (why a tune that exited early did)."""
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""


def start_tune(argv: list[str], runs_dir: Path, after: int) -> TuneProcess:
    """Start ``argv`` with its output to RUNS_DIR/tune-TIME.log (OSError when it cannot start)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = runs_dir / f"tune-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # the terminal's signals are the app's, not the tune's
    return TuneProcess(proc, argv, log, after)


def newest_id(path: Path) -> int:
    """The highest study id in the history file (0 without one)."""
    if not path.is_file():
        return 0
    from tuner.bench.history import History
    from tuner.tune.store import Store

    history = History(path, busy_ms=2000)
    try:
        return max((int(s["id"]) for s in Store(history).studies()), default=0)
    finally:
        history.close()


class TuneLoaded(Message):
    """The history was read (from a thread worker): the studies, the one shown, its trials and summary, or why
    it could not be read."""

    def __init__(self, studies: list[dict[str, Any]], study: dict[str, Any] | None = None,
                 trials: list[dict[str, Any]] | None = None, summary: dict[str, Any] | None = None,
                 error: str | None = None) -> None:
        super().__init__()
        self.studies, self.study, self.trials, self.summary, self.error = studies, study, trials or [], summary, error
        self.generation = 0  #: which read this answers (an older one's answer is dropped)


class TuneStarted(Message):
    """A tune process started (from a thread worker), or why it did not."""

    def __init__(self, tune: TuneProcess | None, error: str | None = None) -> None:
        super().__init__()
        self.tune, self.error = tune, error


class TuneDialog(ModalScreen[dict[str, str] | None]):
    """A new tune's budget, trial length and space; Enter starts it, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, workload: str, fixed: str, space: str) -> None:
        super().__init__()
        self.workload, self.fixed, self.space = workload, fixed, space

    def compose(self) -> ComposeResult:
        with Vertical(id="tune-dialog"):
            yield Static(Text.assemble(("New tune: ", "bold"), self.workload, " ", (self.fixed, "dim")))
            with Horizontal(classes="tune-field"):
                yield Static("budget", classes="tune-label")
                yield Input(DEFAULT_BUDGET, id="tune-budget", compact=True)
            with Horizontal(classes="tune-field"):
                yield Static("trial seconds", classes="tune-label")
                yield Input(DEFAULT_TRIAL_SECONDS, id="tune-seconds", compact=True)
            with Horizontal(classes="tune-field"):
                yield Static("space", classes="tune-label")
                yield Input(self.space, id="tune-space", compact=True)
            yield Static(Text("budget: a number of trials or a wall time (90s, 30m, 2h); space: NAME=V1,V2 or "
                              "NAME=A..B items; a knob left out is fixed at the form's value.", style="dim"))
            yield Static("", id="tune-error")
            with Horizontal(id="buttons"):
                yield Button("Start (enter)", id="start", variant="success")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#tune-budget", Input).focus()

    def values(self) -> dict[str, str]:
        return {k: self.query_one(f"#tune-{k}", Input).value.strip() for k in ("budget", "seconds", "space")}

    def submit(self) -> None:
        v = self.values()
        try:
            ok = float(v["seconds"]) > 0 and math.isfinite(float(v["seconds"]))
        except ValueError:
            ok = False
        error = ("trial seconds: expected a number > 0" if not ok else "budget: give trials or a time" if
                 not v["budget"] else "space: give at least one NAME=V1,V2" if not v["space"] else None)
        if error:
            self.query_one("#tune-error", Static).update(Text(error, style="bold red"))
            return
        self.dismiss(v)

    def on_input_submitted(self) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TuneScreen(BtuneScreen):
    """``btune tune``'s studies: pick one; its trials, the measured ones charted with the front marked, the best
    setting and its command; n starts a tune of the launch form's workload, s stops it early."""

    HELP = ("btune tune's studies (in RUNS_DIR/bench-history.sqlite): choose one at the top. The table lists its "
            "trials (phase, rung, setting, state, objective values, tokens/s, peak memory), the settings never "
            "launched last with the reason; the chart shows every trial measured ok, its first objective against "
            "its peak memory (against the trial number where no peak was measured, as on the CPU), the Pareto "
            "front's settings marked ◆; the line under it names the best setting and its btune run command. "
            "While a study runs the screen follows it every second. n starts a tune of the launch form's workload "
            "(its options that differ from the defaults are fixed; budget, trial seconds and the space in a "
            "dialog) and follows it; s stops it early (the running trial is cancelled, the study ends "
            "interrupted; btune tune --resume ID continues it). Enter on a trial opens its record on the replay "
            "screen, r reloads.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "new_tune", "New tune"),
        Binding("s", "stop", "Stop early"),
        Binding("r", "reload", "Reload"),
        Binding("escape,b", "back", "Back"),
    ]

    app: BtuneApp  # type: ignore[assignment]

    def __init__(self, runs_dir: Path, path: Path | None = None) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.path = path or runs_dir / HISTORY_FILE
        self.studies: list[dict[str, Any]] = []
        self.study: dict[str, Any] | None = None
        self.trials: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] = []  #: the table's trials, top row first
        self.study_id: int | None = None  #: the study chosen (None: the newest)
        self.loaded = False
        self._loading = False
        self._generation = 0  # reads asked for; only the latest one's answer is shown
        self._shown: Any = None  # what the table and chart show (redrawn only when it changes)
        self._options: list[tuple[str, int]] = []

    @property
    def tune(self) -> TuneProcess | None:
        """The tune the app started, if any (running or ended)."""
        return getattr(self.app, "tune_process", None)

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("tune", "bold"), f" {self.path}  (loading…)"), id="tune-title")
        with Horizontal(id="tune-picks"):
            yield Select[int]([], prompt="study", id="tune-study", allow_blank=True, compact=True)
            yield Static("", id="tune-state")
        yield XYChart("", y_from_zero=False, id="tune-chart")
        yield Static("", id="tune-best")
        yield DataTable(id="tune-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        tune = self.tune
        if tune is not None and tune.alive:
            self.study_id = tune.study_id  # follow the tune the app runs
        self.set_interval(1.0, self._tick)
        self.action_reload()

    # -- reading -------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False)
    def _load(self, study_id: int | None, after: int | None, generation: int) -> None:
        try:
            message = self._read(study_id, after)
        except Exception as exc:  # never leave the screen waiting on a read that died
            message = TuneLoaded([], error=f"cannot read {self.path}: {type(exc).__name__}: {exc}")
        message.generation = generation
        self.post_message(message)

    def _read(self, study_id: int | None, after: int | None) -> TuneLoaded:
        if not self.path.is_file():
            return TuneLoaded([], error="none")
        from tuner.bench import BenchError
        from tuner.bench.history import History
        from tuner.tune import TuneError
        from tuner.tune.report import summarize
        from tuner.tune.store import Store

        try:
            history = History(self.path, busy_ms=2000)
        except BenchError as exc:
            return TuneLoaded([], error=str(exc))
        try:
            store = Store(history)
            studies = store.studies()
            ids = [int(s["id"]) for s in studies]
            if after is not None:  # a tune started here: its study once it has made it
                study_id = next((i for i in ids if i > after), study_id)
            if study_id not in ids:
                study_id = ids[-1] if ids else None
            if study_id is None:
                return TuneLoaded(studies)
            study = store.study(str(study_id))
            trials = store.trials(study_id)
            return TuneLoaded(studies, study, trials, summarize(study, trials))
        except (BenchError, TuneError) as exc:
            return TuneLoaded([], error=str(exc))
        finally:
            history.close()

    def action_reload(self) -> None:
        tune = self.tune
        after = tune.after if tune is not None and tune.study_id is None and tune.alive else None
        self._loading = True
        self._generation += 1
        self._load(self.study_id, after, self._generation)

    def _tick(self) -> None:
        """Every second: note a tune that ended; read the history again while the study shown runs."""
        tune = self.tune
        if tune is not None and not tune.alive and not tune.reported:
            tune.reported = True
            code = tune.proc.returncode
            line = tune.last_line()
            self.notify(f"the tune ended (exit status {code})" + (f": {line}" if code == 2 and line else ""),
                        severity="error" if code == 2 else "information")
            self.action_reload()
            return
        running = (self.study or {}).get("state") == "running" or (tune is not None and tune.alive)
        if running and not self._loading:
            self.action_reload()

    def on_tune_loaded(self, message: TuneLoaded) -> None:
        if message.generation != self._generation:
            return  # a read asked for before another study was chosen
        self._loading = False
        self.loaded = True
        self.studies, self.study, self.trials, self.summary = (message.studies, message.study, message.trials,
                                                               message.summary)
        tune = self.tune
        if self.study is not None:
            self.study_id = int(self.study["id"])
            if tune is not None and tune.study_id is None and self.study_id > tune.after:
                tune.study_id = self.study_id
        title = self.query_one("#tune-title", Static)
        if message.error == "none":
            title.update(Text.assemble(("tune", "bold"), f": no history at {self.path} yet. Start a tune with n "
                                       "(the launch form's workload) or btune tune WORKLOAD."))
        elif message.error:
            title.update(Text(message.error, style="red"))
        else:
            title.update(Text.assemble(("tune", "bold"), f" {self.path}  {len(self.studies)} "
                                       f"stud{'ies' if len(self.studies) != 1 else 'y'}"))
        select = self.query_one("#tune-study", Select)
        options = [(f"{s['id']} {s['name']} · {s['state']}", int(s["id"])) for s in reversed(self.studies)]
        if options != self._options:
            self._options = options
            select.set_options(options)
        if self.study_id is not None and select.value != self.study_id:
            select.value = self.study_id
        self._show()

    @on(Select.Changed, "#tune-study")
    def _study_changed(self, event: Select.Changed) -> None:
        value = event.value
        if isinstance(value, int) and value != self.study_id:
            self.study_id = value
            self.action_reload()

    # -- showing -------------------------------------------------------------------------------------
    def objectives(self) -> list[str]:
        return list(((self.study or {}).get("plan") or {}).get("objectives") or [])

    def _show(self) -> None:
        shown = (self.study and (self.study["id"], self.study["state"], self.study.get("spent_s")), repr(self.trials))
        self._state_line()
        if shown == self._shown:
            return
        self._shown = shown
        self._table()
        self._chart()
        self._best()

    def _state_line(self) -> None:
        st, tune = self.study, self.tune
        parts: list[str | tuple[str, str]] = []
        if st is not None:
            counts: dict[str, int] = {}
            for t in self.trials:
                counts[t["state"]] = counts.get(t["state"], 0) + 1
            style = {"running": "bold green", "done": "bold", "interrupted": "yellow"}.get(st["state"], "red")
            parts += [(st["state"], style), f"  {st['workload']}  {float(st.get('spent_s') or 0):.0f} s  ",
                      ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"]
        if tune is not None:
            proc = ("stopping…" if tune.stopping else "running") if tune.alive else f"exited {tune.proc.returncode}"
            parts.append((f"  · tune process {tune.proc.pid}: {proc}", "dim"))
        self.query_one("#tune-state", Static).update(Text.assemble(*parts))

    def _table(self) -> None:
        table = self.query_one(DataTable)
        objs = self.objectives()
        tps = "tokens_per_s" not in objs  # tokens/s as a column of its own unless it is an objective
        columns = [*COLUMNS, *((f"obj{i}", o) for i, o in enumerate(objs)),
                   *([("tokens_per_s", "tokens/s")] if tps else []), ("peak", "peak MiB")]
        cursor = table.cursor_row
        if [str(c.label) for c in table.columns.values()] != [label for _, label in columns]:
            table.clear(columns=True)
            for key, label in columns:
                table.add_column(label, key=key)
        else:
            table.clear()
        self.rows = ([t for t in self.trials if t["state"] != "pruned"]
                     + [t for t in self.trials if t["state"] == "pruned"])
        from tuner.tune.space import describe

        for i, t in enumerate(self.rows):
            vals = t.get("objective_values") or [None] * len(objs)
            figs = t.get("figures") or {}
            peak = peak_bytes(t)
            state = Text(t["state"] + (f": {t['reason']}" if t.get("reason") and t["state"] != "ok" else ""),
                         style=STATE_STYLES.get(t["state"], ""))
            table.add_row("-" if t["state"] == "pruned" else str(t["number"]), t["phase"],
                          "-" if t["rung"] < 0 else str(t["rung"]), describe(t["setting"]) or "(defaults)", state,
                          *(fmt(v) if isinstance(v, (int, float)) else "-" for v in vals[:len(objs)]),
                          *([fmt(figs["tokens_per_s"]) if isinstance(figs.get("tokens_per_s"), (int, float)) else
                             "-"] if tps else []),
                          f"{peak / MIB:,.1f}" if peak else "-", key=str(i))
        if self.rows:
            table.move_cursor(row=min(max(cursor, 0), len(self.rows) - 1))

    def points(self) -> tuple[list[tuple[float, float, dict[str, Any]]], str]:
        """The chart's points: (x, y, trial) for every trial measured ok, and what x is (``peak MiB`` when every
        one measured a peak, else ``trial``)."""
        ok = [t for t in self.trials if t["state"] == "ok" and t.get("objective_values")
              and isinstance(t["objective_values"][0], (int, float))]
        by_peak = bool(ok) and all(peak_bytes(t) for t in ok)
        return ([((peak_bytes(t) or 0) / MIB if by_peak else float(t["number"]), float(t["objective_values"][0]), t)
                 for t in ok], "peak MiB" if by_peak else "trial")

    def front_settings(self) -> list[dict[str, Any]]:
        return [m["setting"] for m in ((self.summary or {}).get("front") or {}).get("members", [])]

    def _chart(self) -> None:
        chart = self.query_one(XYChart)
        objs = self.objectives()
        points, x_name = self.points()
        if not points:
            chart.set_data([])
            return
        front = self.front_settings()
        on_front = [p for p in points if p[2]["setting"] in front]
        rest = [p for p in points if p[2]["setting"] not in front]
        chart.set_data([], [Marks(tuple(p[0] for p in rest), tuple(p[1] for p in rest), "green", "●"),
                            Marks(tuple(p[0] for p in on_front), tuple(p[1] for p in on_front), "bold yellow", "◆")],
                       legend=[(f"● {objs[0] if objs else 'objective'} per trial, x: {x_name}", "green"),
                               *([("◆ front", "bold yellow")] if on_front else [])])

    def _best(self) -> None:
        from tuner.tune.space import describe

        line = self.query_one("#tune-best", Static)
        if self.study is None:
            line.update("")
            return
        best = (self.summary or {}).get("best")
        if not best:
            line.update(Text("no trial has finished with every objective measured yet" if
                             self.study["state"] == "running" else
                             "no trial finished with every objective measured", style="dim"))
            return
        values = ", ".join(f"{n} {fmt(v)}" for n, v in zip(self.objectives(), best["values"], strict=False))
        line.update(Text.assemble(("best: ", "bold"), (describe(best["setting"]) or "(defaults)", "bold green"),
                                  f"  {values} (rung {best['rung']}, {best['runs']} run{'s' * (best['runs'] > 1)})\n",
                                  ("$ ", "bold"), best["command"]))

    # -- a trial's record --------------------------------------------------------------------------
    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        self.open_trial(int(str(event.row_key.value)))

    def open_trial(self, index: int) -> None:
        """Open the record of table row ``index`` on the replay screen (a trial without one says so)."""
        if not 0 <= index < len(self.rows):
            return
        t = self.rows[index]
        path = t.get("record_path")
        try:
            if path:
                p = Path(path)
                rec = runs.load_record(p if p.is_file() or p.is_absolute() else self.runs_dir / p)
            elif t.get("run_id"):
                rec = runs.load_record(runs.resolve_run(t["run_id"], self.runs_dir))
            else:
                self.notify(f"this trial has no record ({t['state']})", severity="warning")
                return
        except runs.RunFileError as exc:
            self.notify(str(exc), severity="error")
            return
        from tuner.tui.screens.replay import ReplayScreen

        self.app.push_screen(ReplayScreen(rec, self.app.refresh_hz))

    # -- starting and stopping a tune ----------------------------------------------------------------
    def action_new_tune(self) -> None:
        """Ask for a budget, trial length and space, then tune the launch form's workload with its options."""
        from tuner.command import WORKLOAD as COMMAND
        from tuner.tui.screens.launch import LaunchScreen

        tune = self.tune
        if tune is not None and tune.alive:
            self.notify("a tune is already running (s stops it)", severity="warning")
            return
        launch = next((s for s in self.app.screen_stack if isinstance(s, LaunchScreen)), None)
        if launch is None or launch.form is None or launch.workload == COMMAND:
            self.notify("choose a workload on the launch screen first (a command cannot be tuned)",
                        severity="warning")
            return
        values, errors = launch.form.collect()
        if errors:
            self.notify(f"fix the launch form first: {next(iter(errors.values()))}", severity="error")
            return
        workload = launch.workload
        spec = catalog.get(workload)
        fixed = " ".join(catalog.to_argv(spec, {k: v for k, v in values.items() if k not in NOT_FIXED}))

        def answer(result: dict[str, str] | None) -> None:
            if result:
                self.start(workload, values, result["budget"], result["seconds"], result["space"])

        self.app.push_screen(TuneDialog(workload, fixed, default_space(workload, values)), answer)

    def start(self, workload: str, values: dict[str, Any], budget: str = DEFAULT_BUDGET,
              trial_seconds: str = DEFAULT_TRIAL_SECONDS, space: str | None = None) -> list[str]:
        """Start ``btune tune`` of ``workload`` (``values``: the launch form's) and follow its study; the argv."""
        argv = tune_argv(self.runs_dir, workload, values, budget, trial_seconds,
                         default_space(workload, values) if space is None else space)
        self._start(argv)
        return argv

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def _start(self, argv: list[str]) -> None:
        try:
            tune = start_tune(argv, self.runs_dir, newest_id(self.path))
        except Exception as exc:
            self.post_message(TuneStarted(None, f"cannot start the tune: {type(exc).__name__}: {exc}"))
            return
        self.post_message(TuneStarted(tune))

    def on_tune_started(self, message: TuneStarted) -> None:
        if message.tune is None:
            self.notify(message.error or "cannot start the tune", severity="error")
            return
        self.app.tune_process = message.tune
        self.notify(f"tune started (log {message.tune.log}); s stops it early")
        self.action_reload()

    def action_stop(self) -> None:
        """SIGINT to the tune: the running trial is cancelled, the study ends interrupted."""
        tune = self.tune
        if tune is None or not tune.stop():
            self.notify("no tune started here is running", severity="warning")
            return
        self.notify("stopping the tune: the running trial is cancelled, the study ends interrupted")
        self._state_line()

    def action_back(self) -> None:
        self.app.pop_screen()

    def commands(self) -> list[Command]:
        return [("Tune the launch form's workload", "btune tune with the form's options fixed (key: n)",
                 self.action_new_tune)]


STATE_STYLES = {"ok": "green", "running": "bold green", "failed": "red", "oom": "red", "infeasible": "yellow",
                "pruned": "dim", "lost": "yellow", "interrupted": "yellow"}


def peak_bytes(trial: dict[str, Any]) -> float | None:
    """A trial's measured peak memory in bytes, if it measured one."""
    v = (trial.get("figures") or {}).get("peak_bytes") or trial.get("measured_bytes")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None
