"""The power profile of a run: energy per phase from the NVML counter, the power integral beside it.

A run's phases are its ``phase`` events (btune's own workloads: building, compiling, warm-up, measuring,
draining; a script's through the reporting API: its own names, "eval", "checkpoint"...), each lasting until
the next one, the first from the run's start ("starting"), the last until its end. For each phase and each of
the run's GPUs (tuner.summary.energy_gpus) the counter is read at the phase's bounds, linearly interpolated
between its samples, the bounds cut to the span of the readings as the run's own energy is (so the phases add
up to it); a phase wholly outside that span has no energy (None), never a guess.
The power integral (trapezoid of the sampled power over the same bounds) is the cross-check.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

START = "starting"  #: the phase before the first phase event


def interpolate(ts: Sequence[float], ys: Sequence[float], t: float) -> float | None:
    """y at ``t`` on the polyline (ts, ys) (ts ascending); None outside [ts[0], ts[-1]]."""
    if not ts or t < ts[0] or t > ts[-1]:
        return None
    i = bisect.bisect_left(ts, t)
    if ts[i] == t or i == 0:
        return ys[i]
    t0, t1, y0, y1 = ts[i - 1], ts[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (t - t0) / (t1 - t0) if t1 > t0 else y1


def integral(ts: Sequence[float], ys: Sequence[float], a: float, b: float) -> float | None:
    """The integral of the polyline (ts, ys) over [a, b] (trapezoids, the bounds interpolated); None when
    [a, b] is not inside the sampled span."""
    ya, yb = interpolate(ts, ys, a), interpolate(ts, ys, b)
    if ya is None or yb is None or b < a:
        return None
    pts = [(a, ya)] + [(t, y) for t, y in zip(ts, ys, strict=True) if a < t < b] + [(b, yb)]
    return sum((t1 - t0) * (y0 + y1) / 2.0 for (t0, y0), (t1, y1) in itertools.pairwise(pts))


def _points(cols: dict[str, Any], field: str) -> tuple[list[float], list[float]]:
    pts = sorted((t, v) for t, v in zip(cols.get("t") or [], cols.get(field) or [], strict=False)
                 if isinstance(t, (int, float)) and isinstance(v, (int, float)) and not isinstance(v, bool))
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _clip(ts: Sequence[float], t0: float, t1: float) -> tuple[float, float]:
    """[t0, t1] cut to the sampled span [ts[0], ts[-1]] (the run's first phase starts before the first reading,
    its last ends after the last); empty (hi < lo) when the phase lies outside it."""
    if not ts:
        return t0, t1
    return max(t0, ts[0]), min(t1, ts[-1])


def phase_spans(events: list[dict[str, Any]], started: float, ended: float) -> list[tuple[str, float, float]]:
    """``(name, t0, t1)`` of each phase in order, from the phase events of the lowest rank that sent any."""
    marks = [e for e in events if e.get("type") == "phase" and isinstance(e.get("t"), (int, float))]
    if marks:
        rank = min(int(e.get("rank") or 0) for e in marks)
        marks = sorted((e for e in marks if int(e.get("rank") or 0) == rank), key=lambda e: e["t"])
    spans: list[tuple[str, float, float]] = []
    name, t0 = START, started
    for e in marks:
        t = min(max(float(e["t"]), started), ended)
        if t > t0:
            spans.append((name, t0, t))
        name, t0 = str(e["phase"]), t
    spans.append((name, t0, ended))
    return [s for s in spans if s[2] > s[1]]


def profile(series: dict[str, Any], events: list[dict[str, Any]], started: float, ended: float,
            gpus: list[str] | None, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per phase: its bounds (seconds from the run's start), energy of ``gpus`` (the run's GPUs, series
    keys; None: no energy can be charged) from the counter and from the power integral, mean power, the steps
    that ended in it, their tokens and joules per token."""
    energy = series.get("energy") or {}
    power = series.get("gpu") or {}
    counters = {g: _points(energy[g], "mj") for g in gpus or [] if g in energy}
    watts = {g: _points(power[g], "power_w") for g in gpus or [] if g in power}
    rows = []
    for name, t0, t1 in phase_spans(events, started, ended):
        inside = [s for s in steps if s.get("t_end") is not None and t0 < s["t_end"] <= t1]
        tokens = sum(s["tokens"] or 0 for s in inside) if any(s["tokens"] for s in inside) else None
        joules: float | None = None
        if counters:
            parts = []
            for ts, mj in counters.values():
                lo, hi = _clip(ts, t0, t1)
                a, b = interpolate(ts, mj, lo), interpolate(ts, mj, hi)
                parts.append(None if hi < lo or a is None or b is None else (b - a) / 1000.0)
            joules = sum(parts) if all(p is not None for p in parts) else None  # type: ignore[misc]
        integrated: float | None = None
        if watts:
            parts2 = [integral(ts, w, *_clip(ts, t0, t1)) for ts, w in watts.values()]
            integrated = sum(parts2) if all(p is not None for p in parts2) else None  # type: ignore[misc]
        duration = t1 - t0
        rows.append({
            "phase": name, "start_s": t0 - started, "duration_s": duration, "energy_j": joules,
            "energy_integrated_j": integrated, "power_w": joules / duration if joules is not None else None,
            "steps": len(inside), "tokens": tokens,
            "joules_per_token": joules / tokens if joules is not None and tokens else None,
        })
    return rows


def integrated_total(series: dict[str, Any], gpus: list[str] | None) -> float | None:
    """The power integral over each of ``gpus``' whole sampled span, summed: the energy counter's cross-check."""
    power = series.get("gpu") or {}
    total, seen = 0.0, False
    for g in gpus or []:
        ts, w = _points(power.get(g) or {}, "power_w")
        if len(ts) >= 2:
            value = integral(ts, w, ts[0], ts[-1])
            if value is not None:
                total += value
                seen = True
    return total if seen else None
