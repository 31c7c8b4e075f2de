"""Headless replay: a run record's timeline re-emitted as text or JSON lines, at any speed.

Never imports textual and never executes anything from the file: it only reads data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TextIO

from tuner import runs
from tuner.report import blocks, fmt, quantity

_SERIES_GROUP_FIELD = {"step": "rank", "gpu": "gpu", "energy": "gpu", "series": "name"}


def _rows(kind: str, cols: dict[str, list[Any]], extra: dict[str, Any]) -> Iterator[dict[str, Any]]:
    ts = cols.get("t") or []
    names = list(cols)
    for i in range(len(ts)):
        row = {"type": kind, "t": ts[i], **extra}
        for name in names:
            if name != "t":
                value = cols[name][i] if i < len(cols[name]) else None
                if value is not None:
                    row[name] = value
        yield row


def timeline(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every series row and kept event of a record as events, sorted by time."""
    out: list[dict[str, Any]] = []
    for kind, value in (rec.get("series") or {}).items():
        if not isinstance(value, dict):
            continue
        group_field = _SERIES_GROUP_FIELD.get(kind)
        if group_field is None:
            out.extend(_rows(kind, value, {"rank": -1}))
            continue
        for name, cols in value.items():
            if not isinstance(cols, dict):
                continue
            extra: dict[str, Any] = {group_field: int(name) if name.lstrip("-").isdigit() else name}
            if group_field != "rank":
                extra["rank"] = -1
            out.extend(_rows(kind, cols, extra))
    for ev in rec.get("events") or []:
        if isinstance(ev, dict) and isinstance(ev.get("t"), (int, float)):
            out.append({k: v for k, v in ev.items() if k != "v"})
    out.sort(key=lambda e: e["t"] if isinstance(e.get("t"), (int, float)) else 0.0)
    return out


def describe_event(ev: dict[str, Any], t0: float) -> str:
    """One human line for an event."""
    kind = ev.get("type")
    head = f"+{ev['t'] - t0:9.3f}s {kind:<6}"
    if kind == "step":
        tag = " warmup" if ev.get("warmup") else ""
        loss = f" loss {fmt(ev.get('loss'))}" if "loss" in ev else ""
        return f"{head} rank {ev.get('rank')} step {ev.get('step')} {quantity(ev.get('step_ms'), 'ms')} " \
               f"{ev.get('tokens')} tokens{loss}{tag}"
    if kind == "gpu":
        return f"{head} gpu {ev.get('gpu')} {quantity(ev.get('power_w'), 'W')} " \
               f"{quantity(ev.get('mem_used_mb'), 'MiB', 'count')} util {fmt(ev.get('util_gpu'), kind='percent')} " \
               f"{quantity(ev.get('temp_c'), 'C', 'count')}"
    if kind == "host":
        return f"{head} cpu {fmt(ev.get('proc_cpu_percent'), kind='percent')} " \
               f"rss {quantity(ev.get('proc_rss_mb'), 'MiB', 'count')}"
    if kind == "energy":
        return f"{head} gpu {ev.get('gpu')} counter {quantity(ev.get('mj'), 'mJ')}"
    if kind == "log":
        return f"{head} {ev.get('stream', '')} {ev.get('message', '')}"
    if kind in ("error", "telemetry_note"):
        return f"{head} {ev.get('kind', '')} {ev.get('message', '')}"
    rest = {k: v for k, v in ev.items() if k not in ("type", "t", "rank")}
    text = runs.dumps(rest).decode()  # integers beyond 64 bits as strings, as records keep them
    return f"{head} rank {ev.get('rank')} {text[:300]}"


def replay(rec: dict[str, Any], out: TextIO, speed: float = 0.0, as_json: bool = False,
           sleep: Any = time.sleep) -> int:
    """Write the timeline to ``out`` at ``speed`` times real time (0: at once). Returns lines written."""
    events = timeline(rec)
    t0 = float(rec.get("started_ts") or (events[0]["t"] if events else 0.0))
    wall0 = time.monotonic()
    n = 0
    header = {"type": "run", "id": rec["id"], "status": rec["status"], "workload": rec["config"].get("workload")}
    out.write((runs.dumps(header).decode() if as_json else f"replay {rec['id']} ({rec['status']})") + "\n")
    for ev in events:
        if speed > 0:
            due = (ev["t"] - t0) / speed - (time.monotonic() - wall0)
            if due > 0:
                sleep(due)
        out.write((runs.dumps(ev).decode() if as_json else describe_event(ev, t0)) + "\n")
        n += 1
    end = {"type": "end", "status": rec["status"], "exit_code": rec["exit_code"], "summary": rec["summary"]}
    if as_json:
        out.write(runs.dumps(end).decode() + "\n")
    else:
        out.write(f"end: {rec['status']} (exit {rec['exit_code']})\n")
        figures = blocks(rec["summary"], rec["config"].get("workload"))
        if figures:
            out.write(figures + "\n")
    out.flush()
    return n
