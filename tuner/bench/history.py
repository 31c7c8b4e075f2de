"""The bench history: one SQLite file, a table per entity, versioned, safe for concurrent writers.

``rounds``: one ``btune bench`` invocation (config, environment, the user's commit); ``runs``: one run of a job
(its record, its status); ``metrics``: one figure of a run; ``studies`` and ``trials``: ``btune tune``'s (its plan,
each trial's setting, state and figures: tuner.tune.store). WAL mode and a busy timeout let several benches
append to one file; each job's rows are one transaction, so a reader never sees half a job.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuner.bench import BenchError

#: 2: a figure's direction and tolerance as its bench config watched it (``better``, ``tolerance``); btune tune's
#: studies and trials
SCHEMA_VERSION = 2
BUSY_MS = 30_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, ended TEXT, config_name TEXT NOT NULL,
    config_hash TEXT, gpu TEXT, driver TEXT, torch TEXT, btune TEXT, host TEXT, git_commit TEXT, result_dir TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL REFERENCES rounds(id), job TEXT NOT NULL,
    repeat_index INTEGER NOT NULL, run_id TEXT, record_path TEXT, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    run INTEGER NOT NULL REFERENCES runs(id), job TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    unit TEXT NOT NULL DEFAULT '', better INTEGER, tolerance REAL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created TEXT NOT NULL, workload TEXT NOT NULL,
    plan TEXT NOT NULL, state TEXT NOT NULL, spent_s REAL NOT NULL DEFAULT 0, result_dir TEXT, gpu TEXT, host TEXT);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study INTEGER NOT NULL REFERENCES studies(id), number INTEGER NOT NULL,
    setting TEXT NOT NULL, rung INTEGER NOT NULL, phase TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    objective_values TEXT, figures TEXT, estimate_bytes INTEGER, predicted_bytes REAL, measured_bytes REAL,
    run_id TEXT, record_path TEXT, wall_s REAL, started TEXT, ended TEXT);
CREATE INDEX IF NOT EXISTS trials_study ON trials(study, number);
CREATE INDEX IF NOT EXISTS runs_round ON runs(round, job);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run);
"""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class History:
    """An open history file (BenchError, one line, when it is unreadable, locked or from a newer btune)."""

    def __init__(self, path: str | Path, busy_ms: int = BUSY_MS) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=busy_ms / 1000, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
            self._wal(time.monotonic() + busy_ms / 1000)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(stmt)
                row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
                if row[0] is None:
                    self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise BenchError(f"{self.path}: history schema version {row[0]} is newer than this btune's "
                                     f"({SCHEMA_VERSION}); use a newer btune or another --history")
                elif row[0] == 1:  # version 1 had no direction or tolerance per figure: the registry's then
                    self.db.execute("ALTER TABLE metrics ADD COLUMN better INTEGER")
                    self.db.execute("ALTER TABLE metrics ADD COLUMN tolerance REAL")
                    self.db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise BenchError(f"cannot use history {self.path}: {exc}") from None
        except OSError as exc:
            raise BenchError(f"cannot use history {self.path}: {exc.strerror or exc}") from None

    def _wal(self, deadline: float) -> None:
        """WAL mode (persistent in the file); a new file's first openers may race for it, which SQLite answers
        busy without waiting, so this retries until ``deadline``."""
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not ("locked" in str(exc) or "busy" in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]] = ((),)) -> int:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            cur = None
            for row in rows:
                cur = self.db.execute(sql, row)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise BenchError(f"history {self.path}: {exc}") from None
        return cur.lastrowid if cur is not None else 0

    def start_round(self, config_name: str, config_hash: str, commit: str | None, result_dir: str,
                    started: float | None = None) -> int:
        """A new round's id."""
        return self._write("INSERT INTO rounds (started, config_name, config_hash, git_commit, result_dir) "
                           "VALUES (?, ?, ?, ?, ?)",
                           [(_iso(started or time.time()), config_name, config_hash, commit, result_dir)])

    def end_round(self, round_id: int, env: dict[str, Any], ended: float | None = None) -> None:
        """Close a round with the environment its runs recorded (GPU, driver, torch, btune, host)."""
        self._write("UPDATE rounds SET ended = ?, gpu = ?, driver = ?, torch = ?, btune = ?, host = ? WHERE id = ?",
                    [(_iso(ended or time.time()), env.get("gpu"), env.get("driver"), env.get("torch"),
                      env.get("btune"), env.get("host"), round_id)])

    def add_job(self, round_id: int, job: str, runs: list[dict[str, Any]]) -> None:
        """A job's runs and their figures, one transaction: each run ``{repeat, run_id, record_path, status,
        metrics: [(metric, value, unit[, higher_is_better, tolerance])]}`` (the last two as a watch declared them;
        absent or None: the registry's direction, the reader's tolerance)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            for run in runs:
                cur = self.db.execute(
                    "INSERT INTO runs (round, job, repeat_index, run_id, record_path, status) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (round_id, job, run["repeat"], run.get("run_id"), run.get("record_path"), run["status"]))
                self.db.executemany(
                    "INSERT INTO metrics (run, job, metric, value, unit, better, tolerance) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cur.lastrowid, job, *(*fig, None, None)[:5]) for fig in run.get("metrics", ())])
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise BenchError(f"history {self.path}: {exc}") from None

    # -- reading ---------------------------------------------------------------------------------
    def rounds(self, config_name: str | None = None) -> list[dict[str, Any]]:
        """Every round (of one config when given), oldest first."""
        q = "SELECT * FROM rounds" + (" WHERE config_name = ?" if config_name else "") + " ORDER BY id"
        cur = self.db.execute(q, (config_name,) if config_name else ())
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def values(self, config_name: str | None = None) -> dict[tuple[int, str, str], list[float]]:
        """``(round, job, metric) -> [value per run]`` over the history (of one config when given)."""
        q = ("SELECT r.round, m.job, m.metric, m.value FROM metrics m JOIN runs r ON m.run = r.id "
             "JOIN rounds o ON r.round = o.id" + (" WHERE o.config_name = ?" if config_name else "") +
             " ORDER BY r.round, r.id")
        out: dict[tuple[int, str, str], list[float]] = {}
        for rnd, job, metric, value in self.db.execute(q, (config_name,) if config_name else ()):
            out.setdefault((rnd, job, metric), []).append(value)
        return out

    def job_runs(self, round_id: int) -> dict[str, list[str]]:
        """``job -> [status per run]`` of one round."""
        out: dict[str, list[str]] = {}
        for job, status in self.db.execute("SELECT job, status FROM runs WHERE round = ? ORDER BY id", (round_id,)):
            out.setdefault(job, []).append(status)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows: round, started, commit, gpu, job, metric, value, unit, run id (an export), and the figure's
        watched direction (``better``: True higher, False lower, None the registry's) and tolerance (or None)."""
        cur = self.db.execute(
            "SELECT o.id, o.started, o.git_commit, o.gpu, m.job, m.metric, m.value, m.unit, r.run_id, m.better, "
            "m.tolerance FROM metrics m JOIN runs r ON m.run = r.id JOIN rounds o ON r.round = o.id "
            "ORDER BY o.id, r.id")
        keys = ("round", "started", "commit", "gpu", "job", "metric", "value", "unit", "run_id", "better", "tolerance")
        rows = [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]
        for row in rows:
            row["better"] = None if row["better"] is None else bool(row["better"])
        return rows
