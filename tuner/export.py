"""Exports for dashboards: flat JSON records, CSV, and Prometheus text exposition.

One row per (run, metric, statistic): ``run_id, workload, status, started, options, metric,
statistic, value, unit``. Flat rows suit Grafana's Infinity data source and Superset alike.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from tuner.metrics import EXPORTED_STATS, figures

FORMATS = ("json", "csv", "prometheus")
def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rows(rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The flat metric rows of one run."""
    s = rec["summary"]
    base = {
        "run_id": rec["id"],
        "workload": _dig(rec, ("config", "workload")),
        "status": rec["status"],
        "started": rec["started"],
        "options": _dig(rec, ("config", "options")) or {},
    }

    def row(metric: str, statistic: str, value: Any, unit: str) -> dict[str, Any]:
        return {**base, "metric": metric, "statistic": statistic, "value": value, "unit": unit}

    workload = base["workload"]
    for f in figures(s, workload, EXPORTED_STATS, exported=True):
        if _number(f.value):
            yield row(f.metric.name, f.stat or "value", f.value, "ratio" if f.unit == "%" else f.unit)
    for gpu, g in (s.get("gpu") or {}).items():
        for stat in ("mean", "max"):
            value = _dig(g, ("power_w", stat))
            if _number(value):
                yield row(f"gpu{gpu}_power", stat, value, "W")
        if _number(g.get("mem_used_mb_max")):
            yield row(f"gpu{gpu}_mem_used", "max", g["mem_used_mb_max"], "MiB")
    for name, p in phase_totals(s.get("phases") or []).items():
        for metric, unit in (("duration_s", "s"), ("energy_j", "J"), ("energy_integrated_j", "J"), ("power_w", "W"),
                             ("tokens", "tokens"), ("joules_per_token", "J/tok")):
            if _number(p.get(metric)):
                yield row(f"phase_{metric}", name, p[metric], unit)


def phase_totals(phases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The power profile by phase name (a phase entered several times, "eval", summed): duration, energy (None
    when any of its spans has none), power integral, mean power, tokens, joules per token."""
    out: dict[str, dict[str, Any]] = {}
    for p in phases:
        if not isinstance(p, dict) or not isinstance(p.get("phase"), str):
            continue
        t = out.setdefault(p["phase"], {"duration_s": 0.0, "energy_j": 0.0, "energy_integrated_j": 0.0, "tokens": 0})
        t["duration_s"] += p.get("duration_s") or 0.0
        for key in ("energy_j", "energy_integrated_j"):
            if t[key] is not None:
                t[key] = t[key] + p[key] if _number(p.get(key)) else None
        t["tokens"] += p.get("tokens") if _number(p.get("tokens")) else 0
    for t in out.values():
        t["power_w"] = t["energy_j"] / t["duration_s"] if t["energy_j"] is not None and t["duration_s"] else None
        t["joules_per_token"] = t["energy_j"] / t["tokens"] if t["energy_j"] is not None and t["tokens"] else None
        if not t["tokens"]:
            t["tokens"] = None
    return out


#: The time series ``btune export --series`` writes: per GPU, every sampled field, and the energy counter.
SERIES_FIELDS = ("power_w", "sm_clock_mhz", "temp_c", "util_gpu", "mem_used_mb", "throttle_reasons")


def series_rows(rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Long rows of a run's GPU time series: ``run_id, gpu, t_s`` (seconds from the run's start), ``field,
    value`` for each sampled field (throttle reasons joined with ``|``) and the energy counter (``energy_j``,
    from the first reading)."""
    t0 = rec.get("started_ts") or 0.0
    series = rec.get("series") or {}
    for gpu, cols in sorted((series.get("gpu") or {}).items()):
        ts = cols.get("t") or []
        for field in SERIES_FIELDS:
            for t, v in zip(ts, cols.get(field) or [], strict=False):
                if field == "throttle_reasons" and isinstance(v, list):
                    v = "|".join(map(str, v))
                elif not _number(v):
                    continue
                yield {"run_id": rec["id"], "gpu": gpu, "t_s": t - t0, "field": field, "value": v}
    for gpu, cols in sorted((series.get("energy") or {}).items()):
        mj = [(t, v) for t, v in zip(cols.get("t") or [], cols.get("mj") or [], strict=False) if _number(v)]
        for t, v in mj:
            yield {"run_id": rec["id"], "gpu": gpu, "t_s": t - t0, "field": "energy_j", "value": (v - mj[0][1]) / 1e3}


def export_series(recs: list[dict[str, Any]], fmt: str) -> bytes:
    """The GPU time series of runs as JSON rows or CSV (Prometheus text holds no series: ValueError)."""
    all_rows = [r for rec in recs for r in series_rows(rec)]
    if fmt == "json":
        return orjson.dumps(all_rows, option=orjson.OPT_INDENT_2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["run_id", "gpu", "t_s", "field", "value"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(all_rows)
        return buf.getvalue().encode()
    raise ValueError(f"--series: the time series export as json or csv, not {fmt}")


def to_json(recs: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps([r for rec in recs for r in rows(rec)], option=orjson.OPT_INDENT_2)


def to_csv(recs: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["run_id", "workload", "status", "started", "options", "metric", "statistic", "value", "unit"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for rec in recs:
        for r in rows(rec):
            r = dict(r)
            r["options"] = " ".join(f"{k}={v}" for k, v in r["options"].items())
            writer.writerow(r)
    return buf.getvalue()


def to_prometheus(recs: Iterable[dict[str, Any]]) -> str:
    """Prometheus text: the live endpoint's names and base units (tuner.prom, docs/prometheus.md)."""
    from tuner.prom import to_prometheus as text

    return text(recs)


def export(recs: list[dict[str, Any]], fmt: str) -> bytes:
    """All runs in one format, as bytes."""
    if fmt == "json":
        return to_json(recs)
    if fmt == "csv":
        return to_csv(recs).encode()
    if fmt == "prometheus":
        return to_prometheus(recs).encode()
    raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
