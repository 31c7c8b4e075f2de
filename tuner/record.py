"""Builds a run record from its event stream: columnar series, kept events, then the summary.

The same builder serves a live run (fed as events arrive) and recovery (fed from a journal), so a
recovered record is built exactly like a normal one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuner.protocol import REQUIRED, SCHEMAS, check_event, scalar_value, valid_envelope, valid_time
from tuner.runs import RECORD_SCHEMA_VERSION, STATUSES, iso_utc, read_journal
from tuner.summary import summarize

#: Envelope keys that are not stored as columns.
_ENVELOPE = frozenset({"v", "type", "rank"})
#: Event types kept as columnar series, and the field that names their column group.
_SERIES_KEY = {"step": "rank", "gpu": "gpu", "energy": "gpu", "host": None, "series": "name"}
MAX_LOG_EVENTS = 5000
#: Columns one series group may hold; keys beyond it are dropped and counted (keys that change with
#: every event would otherwise pad every row of every column: a record quadratic in the events).
MAX_COLUMNS = 128
#: Column groups (ranks, GPUs, named series) one series type may hold.
MAX_GROUPS = 1024


class Columns:
    """Columnar arrays that grow row by row; a key first seen late is padded with None."""

    __slots__ = ("cols", "dropped", "n")

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {}
        self.n = 0
        self.dropped = 0

    def add(self, row: dict[str, Any], skip: frozenset[str] = _ENVELOPE) -> None:
        cols, n = self.cols, self.n
        for key, value in row.items():
            if key in skip:
                continue
            col = cols.get(key)
            if col is None:
                if len(cols) >= MAX_COLUMNS:
                    self.dropped += 1
                    continue
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
        self.rejected_events = 0
        self.rejected_fields = 0
        self.rejected_columns = 0
        self._n_logs = 0
        self.last_t = started

    def add(self, event: Any) -> dict[str, Any] | None:
        """Take one event; returns it as kept (bad fields dropped), or None when it was rejected."""
        if not valid_envelope(event):
            self.rejected_events += 1
            return None
        checked, bad = check_event(event)
        self.rejected_fields += bad
        if checked is None:
            self.rejected_events += 1
            return None
        self._file(checked)
        return checked

    def _file(self, event: dict[str, Any]) -> None:
        type_ = event["type"]
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
                    if len(groups) >= MAX_GROUPS:
                        self.rejected_events += 1
                        return
                    cols = groups[name] = Columns()  # type: ignore[index]
                cols.add(event, _ENVELOPE | {group_key})
            return
        if type_ == "log":
            self._n_logs += 1
            if self._n_logs > MAX_LOG_EVENTS:
                self.logs_dropped += 1
                return
        self.events.append(event)

    def _all_columns(self) -> list[Columns]:
        out: list[Columns] = []
        for value in self.series.values():
            out += [value] if isinstance(value, Columns) else list(value.values())
        return out

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
        output: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The complete record, with the summary computed from the raw series and events."""
        series = self.series_dict()
        ended_t = ended if ended is not None else self.last_t
        options = self.config.get("options") if isinstance(self.config.get("options"), dict) else {}
        summary = summarize(series, self.events, self.started, ended_t, self.environment, options)
        summary["duration_s"] = ended_t - self.started
        if channel:
            summary["channel"] = channel
        if self.logs_dropped:
            summary["logs_dropped"] = self.logs_dropped
        if output and any((output.get("lines_not_kept") or {}).values()):
            summary["output_lines_not_kept"] = sum(output["lines_not_kept"].values())
        columns = self.rejected_columns + sum(c.dropped for c in self._all_columns())
        if self.rejected_events or self.rejected_fields or columns:
            summary["rejected"] = {"events": self.rejected_events, "fields": self.rejected_fields, "columns": columns}
        rec = {
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
        if output is not None:
            rec["output"] = output
        return rec


def journal_header(run_id: str, started: float, config: dict[str, Any], environment: dict[str, Any]) -> dict:
    return {"journal": "start", "id": run_id, "started": started, "config": config, "environment": environment}


def journal_footer(status: str, exit_code: int | None, ended: float, error: dict[str, Any] | None,
                   channel: dict[str, Any], output: dict[str, Any] | None = None) -> dict:
    footer = {"journal": "end", "status": status, "exit_code": exit_code, "ended": ended, "error": error,
              "channel": channel}
    if output is not None:
        footer["output"] = output
    return footer


def _output(v: Any) -> dict[str, Any] | None:
    """A record's ``output`` block with every field of its kind (None when there is none)."""
    if not isinstance(v, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("stdout_tail", "stderr_tail"):
        out[key] = v.get(key) if isinstance(v.get(key), str) else ""
    for key in ("lines", "lines_not_kept"):
        out[key] = {k: int(n) for k, n in (_counts(v.get(key)) or {}).items() if k in ("stdout", "stderr")}
    return out


def _num(v: Any, default: float | None = None) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return v if ok else default


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _error(v: Any) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        return None
    tail = v.get("stderr_tail")
    return {**v, "message": None if v.get("message") is None else str(v.get("message")),
            "stderr_tail": tail if isinstance(tail, str) else ""}


def _exit_code(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31 else None


def _counts(v: Any) -> dict[str, Any] | None:
    return {k: n for k, n in v.items() if _num(n) is not None} if isinstance(v, dict) else None


def record_from_journal(objects: Iterable[Any], run_id: str | None = None) -> dict[str, Any]:
    """Rebuild a record from journal objects; without an end line the status is ``interrupted``.

    ``run_id`` (the journal's file name) names the record; ValueError (one line) for a journal with no
    usable start line.
    """
    builder: RecordBuilder | None = None
    footer: dict[str, Any] | None = None
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        marker = obj.get("journal")
        if marker == "start" and builder is None:
            started = _num(obj.get("started"))
            name = run_id or obj.get("id")
            if started is None or not isinstance(name, str) or not name:
                raise ValueError("journal's start line has no id or start time")
            builder = RecordBuilder(name, started, _obj(obj.get("config")), _obj(obj.get("environment")))
        elif marker == "end":
            footer = obj
        elif builder is not None and "type" in obj:
            builder.add(obj)
    if builder is None:
        raise ValueError("journal has no start line")
    if footer is None or footer.get("status") not in STATUSES:
        return builder.finish(
            "interrupted", None, None,
            {"message": "the console stopped before the run ended; recovered from the journal", "stderr_tail": ""},
        )
    return builder.finish(footer["status"], _exit_code(footer.get("exit_code")), _num(footer.get("ended")),
                          _error(footer.get("error")), _counts(footer.get("channel")), _output(footer.get("output")))


def recover_journal(path: Path, run_id: str | None = None) -> dict[str, Any]:
    """A record rebuilt from a journal file (read with the journal's size and type checks)."""
    return record_from_journal(read_journal(path), run_id)


def _checked_columns(kind: str, cols: Any, group_key: str | None, builder: RecordBuilder) -> Columns | None:
    """A record's column group checked value by value against the event schema of ``kind``: a value of the
    wrong kind becomes null (a dropped field), a row without a valid time or required field is removed
    (a dropped event), a column that is not a list or is one too many is dropped. Counted on ``builder``."""
    if not isinstance(cols, dict) or not isinstance(cols.get("t"), list):
        return None
    schema, required = SCHEMAS.get(kind, {}), REQUIRED.get(kind, ())
    n = len(cols["t"])
    keep = [valid_time(t) for t in cols["t"]]
    checked: dict[str, list[Any]] = {"t": cols["t"]}
    for name, col in cols.items():
        if name == "t" or name in _ENVELOPE or name == group_key:
            continue
        if not isinstance(col, list) or len(checked) >= MAX_COLUMNS:
            builder.rejected_columns += 1
            continue
        ok = schema.get(name, scalar_value)
        col = col[:n] + [None] * (n - len(col))
        bad = [i for i, v in enumerate(col) if v is not None and not ok(v)]
        if bad:
            col = list(col)
            for i in bad:
                col[i] = None
            builder.rejected_fields += len(bad)
        if name in required:
            keep = [k and v is not None for k, v in zip(keep, col, strict=True)]
        checked[name] = col
    if any(r not in checked for r in required if r != group_key):
        builder.rejected_events += n
        return None
    out = Columns()
    if all(keep):
        out.cols, out.n = checked, n
    else:
        rows = [i for i, k in enumerate(keep) if k]
        builder.rejected_events += n - len(rows)
        out.cols, out.n = {name: [col[i] for i in rows] for name, col in checked.items()}, len(rows)
    if out.n == 0:
        return None
    for value in out.cols["t"]:
        builder.last_t = max(builder.last_t, value)
    return out


def _add_series(builder: RecordBuilder, kind: str, value: Any) -> None:
    group_key = _SERIES_KEY[kind]
    if group_key is None:
        cols = _checked_columns(kind, value, None, builder)
        if cols is not None:
            builder.series[kind] = cols
        return
    if not isinstance(value, dict):
        return
    groups: dict[str, Columns] = {}
    for name, cols in list(value.items())[:MAX_GROUPS]:
        if group_key != "name" and not (name.lstrip("-").isdigit() and len(name) < 19):
            builder.rejected_events += 1  # a rank or GPU that is not an integer
            continue
        if group_key == "name" and not 0 < len(name) <= 100:
            builder.rejected_events += 1
            continue
        checked = _checked_columns(kind, cols, group_key, builder)
        if checked is not None:
            groups[name] = checked
    if groups:
        builder.series[kind] = groups


def _config(v: Any) -> dict[str, Any]:
    out = dict(_obj(v))
    for key in ("options", "defaults"):
        out[key] = _obj(out.get(key))
    argv = out.get("argv")
    out["argv"] = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
    if not isinstance(out.get("workload"), str):
        out["workload"] = None if out.get("workload") is None else str(out["workload"])
    return out


def _environment(v: Any) -> dict[str, Any]:
    out = dict(_obj(v))
    gpus = out.get("gpus")
    out["gpus"] = [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []
    out["versions"] = _obj(out.get("versions"))
    if not isinstance(out.get("host"), str):
        out["host"] = None
    return out


def normalize(rec: dict[str, Any]) -> dict[str, Any]:
    """A loaded record as this btune writes one: every series row and event re-checked against the event
    schemas, and the summary recomputed from them. Readers never see a field of the wrong kind."""
    config = _config(rec.get("config"))
    environment = _environment(rec.get("environment"))
    started = _num(rec.get("started_ts"), 0.0) or 0.0
    builder = RecordBuilder(str(rec["id"]), started, config, environment)
    for kind, value in _obj(rec.get("series")).items():
        if kind in _SERIES_KEY:
            _add_series(builder, kind, value)
    for ev in rec.get("events") or []:
        builder.add(ev)
    old = _obj(rec.get("summary"))
    logs = old.get("logs_dropped")
    if isinstance(logs, int) and not isinstance(logs, bool) and logs > 0:
        builder.logs_dropped += logs
    before = _counts(old.get("rejected")) or {}  # what was rejected when the run was recorded
    builder.rejected_events += int(before.get("events") or 0)
    builder.rejected_fields += int(before.get("fields") or 0)
    builder.rejected_columns += int(before.get("columns") or 0)
    ended = _num(rec.get("ended_ts"))
    out = builder.finish(rec["status"], _exit_code(rec.get("exit_code")), ended, _error(rec.get("error")),
                         _counts(old.get("channel")), _output(rec.get("output")))
    for key in ("started", "ended"):  # as written (older records have no *_ts)
        if isinstance(rec.get(key), str) and f"{key}_ts" not in rec:
            out[key] = rec[key]
    return out
