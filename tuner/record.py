"""Builds a run record from its event stream: columnar series, kept events, then the summary.

The same builder serves a live run (fed as events arrive) and recovery (fed from a journal), so a
recovered record is built exactly like a normal one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuner.runs import RECORD_SCHEMA_VERSION, iso_utc, read_journal
from tuner.summary import summarize

#: Envelope keys that are not stored as columns.
_ENVELOPE = frozenset({"v", "type", "rank"})
#: Event types kept as columnar series, and the field that names their column group.
_SERIES_KEY = {"step": "rank", "gpu": "gpu", "energy": "gpu", "host": None, "series": "name"}
MAX_LOG_EVENTS = 5000


class Columns:
    """Columnar arrays that grow row by row; a key first seen late is padded with None."""

    __slots__ = ("cols", "n")

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {}
        self.n = 0

    def add(self, row: dict[str, Any], skip: frozenset[str] = _ENVELOPE) -> None:
        cols, n = self.cols, self.n
        for key, value in row.items():
            if key in skip:
                continue
            col = cols.get(key)
            if col is None:
                col = cols[key] = [None] * n
            col.append(value)
        self.n = n + 1
        for col in cols.values():
            if len(col) < self.n:
                col.append(None)

    def as_dict(self) -> dict[str, list[Any]]:
        return self.cols


class RecordBuilder:
    """Accumulates one run's events; ``finish`` returns the complete record dict."""

    def __init__(self, run_id: str, started: float, config: dict[str, Any], environment: dict[str, Any]) -> None:
        self.run_id = run_id
        self.started = started
        self.config = config
        self.environment = environment
        self.series: dict[str, dict[str, Columns] | Columns] = {}
        self.events: list[dict[str, Any]] = []
        self.logs_dropped = 0
        self._n_logs = 0
        self.last_t = started

    def add(self, event: dict[str, Any]) -> None:
        """Take one decoded event."""
        type_ = event.get("type")
        t = event.get("t")
        if isinstance(t, (int, float)) and t > self.last_t:
            self.last_t = t
        if type_ in _SERIES_KEY:
            group_key = _SERIES_KEY[type_]
            if group_key is None:
                cols = self.series.get(type_)
                if cols is None:
                    cols = self.series[type_] = Columns()
                cols.add(event)  # type: ignore[union-attr]
            else:
                groups = self.series.setdefault(type_, {})
                name = str(event.get(group_key, 0))
                cols = groups.get(name)  # type: ignore[union-attr]
                if cols is None:
                    cols = groups[name] = Columns()  # type: ignore[index]
                cols.add(event, _ENVELOPE | {group_key})
            return
        if type_ == "log":
            self._n_logs += 1
            if self._n_logs > MAX_LOG_EVENTS:
                self.logs_dropped += 1
                return
        self.events.append(event)

    def series_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.series.items():
            if isinstance(value, Columns):
                out[name] = value.as_dict()
            else:
                out[name] = {k: c.as_dict() for k, c in value.items()}
        return out

    def finish(
        self,
        status: str,
        exit_code: int | None,
        ended: float | None = None,
        error: dict[str, Any] | None = None,
        channel: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The complete record, with the summary computed from the raw series and events."""
        series = self.series_dict()
        ended_t = ended if ended is not None else self.last_t
        summary = summarize(series, self.events, self.started, ended_t)
        summary["duration_s"] = ended_t - self.started
        if channel:
            summary["channel"] = channel
        if self.logs_dropped:
            summary["logs_dropped"] = self.logs_dropped
        return {
            "schema_version": RECORD_SCHEMA_VERSION,
            "id": self.run_id,
            "status": status,
            "exit_code": exit_code,
            "started": iso_utc(self.started),
            "ended": iso_utc(ended_t),
            "started_ts": self.started,
            "ended_ts": ended_t,
            "error": error,
            "config": self.config,
            "environment": self.environment,
            "series": series,
            "events": self.events,
            "summary": summary,
        }


def journal_header(run_id: str, started: float, config: dict[str, Any], environment: dict[str, Any]) -> dict:
    return {"journal": "start", "id": run_id, "started": started, "config": config, "environment": environment}


def journal_footer(status: str, exit_code: int | None, ended: float, error: dict[str, Any] | None,
                   channel: dict[str, Any]) -> dict:
    return {"journal": "end", "status": status, "exit_code": exit_code, "ended": ended, "error": error,
            "channel": channel}


def record_from_journal(objects: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild a record from journal objects; without an end line the status is ``interrupted``."""
    builder: RecordBuilder | None = None
    footer: dict[str, Any] | None = None
    for obj in objects:
        marker = obj.get("journal")
        if marker == "start":
            builder = RecordBuilder(obj["id"], float(obj["started"]), obj.get("config") or {},
                                    obj.get("environment") or {})
        elif marker == "end":
            footer = obj
        elif builder is not None and "type" in obj:
            builder.add(obj)
    if builder is None:
        raise ValueError("journal has no start line")
    if footer is None:
        return builder.finish(
            "interrupted", None, None,
            {"message": "the console stopped before the run ended; recovered from the journal", "stderr_tail": ""},
        )
    return builder.finish(footer["status"], footer.get("exit_code"), footer.get("ended"), footer.get("error"),
                          footer.get("channel"))


def recover_journal(path: Path) -> dict[str, Any]:
    """A record rebuilt from a journal file."""
    return record_from_journal(read_journal(path))
