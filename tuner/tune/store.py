"""A tune's study in the bench history file (tuner.bench.history: ``studies`` and ``trials``): its plan, and every
trial as it starts (state ``running``) and ends, each in its own transaction, so a tune killed at any moment keeps
every finished trial and ``--resume`` knows which one was lost."""

from __future__ import annotations

import json
import time
from typing import Any

from tuner.bench import BenchError
from tuner.bench.history import History
from tuner.tune import TuneError

FINISHED = ("ok", "failed", "oom", "infeasible", "pruned")


def _iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def _dump(v: Any) -> str | None:
    return None if v is None else json.dumps(v, sort_keys=True)


class Store:
    """The studies and trials of one history file."""

    def __init__(self, history: History) -> None:
        self.history = history

    def _write(self, sql: str, row: tuple[Any, ...]) -> int:
        try:
            return self.history._write(sql, [row])
        except BenchError as exc:
            raise TuneError(str(exc)) from None

    def create(self, name: str, workload: str, plan: dict[str, Any], result_dir: str, gpu: str, host: str) -> int:
        return self._write("INSERT INTO studies (name, created, workload, plan, state, result_dir, gpu, host) "
                           "VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                           (name, _iso(), workload, json.dumps(plan, sort_keys=True), result_dir, gpu, host))

    def study(self, ref: str) -> dict[str, Any]:
        """A study by id or name (the latest of that name); TuneError when there is none."""
        db = self.history.db
        cur = (db.execute("SELECT * FROM studies WHERE id = ?", (int(ref),)) if ref.isdigit() else
               db.execute("SELECT * FROM studies WHERE name = ? ORDER BY id DESC LIMIT 1", (ref,)))
        names = [d[0] for d in cur.description]
        row = cur.fetchone()
        if row is None:
            raise TuneError(f"no study {ref!r} in {self.history.path} (btune tune --list shows them)")
        out = dict(zip(names, row, strict=True))
        out["plan"] = json.loads(out["plan"])
        return out

    def studies(self) -> list[dict[str, Any]]:
        cur = self.history.db.execute("SELECT id, name, created, workload, state, spent_s, result_dir FROM studies "
                                      "ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def set_state(self, study: int, state: str, spent_s: float) -> None:
        self._write("UPDATE studies SET state = ?, spent_s = ? WHERE id = ?", (state, spent_s, study))

    def start_trial(self, study: int, number: int, setting: dict[str, Any], rung: int, phase: str,
                    estimate: int | None, predicted: float | None) -> int:
        return self._write("INSERT INTO trials (study, number, setting, rung, phase, state, estimate_bytes, "
                           "predicted_bytes, started) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                           (study, number, _dump(setting), rung, phase, estimate, predicted, _iso()))

    def end_trial(self, trial: int, state: str, reason: str | None, values: list[float | None] | None,
                  figures: dict[str, Any], measured: float | None, run_id: str | None, record_path: str | None,
                  wall_s: float) -> None:
        self._write("UPDATE trials SET state = ?, reason = ?, objective_values = ?, figures = ?, measured_bytes = ?, "
                    "run_id = ?, record_path = ?, wall_s = ?, ended = ? WHERE id = ?",
                    (state, reason, _dump(values), _dump(figures), measured, run_id, record_path, wall_s, _iso(),
                     trial))

    def pruned(self, study: int, rows: list[tuple[dict[str, Any], str, int | None, float | None]]) -> None:
        """Settings never launched, ``(setting, reason, estimate, predicted)`` each, in one transaction."""
        now = _iso()
        try:
            self.history._write("INSERT INTO trials (study, number, setting, rung, phase, state, reason, "
                                "estimate_bytes, predicted_bytes, started, ended) "
                                "VALUES (?, 0, ?, -1, 'prune', 'pruned', ?, ?, ?, ?, ?)",
                                [(study, _dump(s), r, e, p, now, now) for s, r, e, p in rows])
        except BenchError as exc:
            raise TuneError(str(exc)) from None

    def trials(self, study: int) -> list[dict[str, Any]]:
        """Every trial row of a study in order (settings, values and figures decoded)."""
        cur = self.history.db.execute("SELECT * FROM trials WHERE study = ? ORDER BY id", (study,))
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            t = dict(zip(names, row, strict=True))
            for k in ("setting", "objective_values", "figures"):
                t[k] = json.loads(t[k]) if t[k] else ({} if k != "objective_values" else None)
            out.append(t)
        return out

    def mark_lost(self, study: int) -> int:
        """Trials left ``running`` by a tune that died: ``lost`` (resume runs them again); how many."""
        cur = self.history.db.execute("SELECT count(*) FROM trials WHERE study = ? AND state = 'running'", (study,))
        n = int(cur.fetchone()[0])
        if n:
            self._write("UPDATE trials SET state = 'lost', ended = ? WHERE study = ? AND state = 'running'",
                        (_iso(), study))
        return n
