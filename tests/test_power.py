"""The power profile (issue 18, item 6): energy per phase from the NVML counter, the power integral beside it,
J/token per phase, and their export; checked against numpy on synthetic counters."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from tuner.export import export, export_series, phase_totals, rows
from tuner.power import integral, interpolate, phase_spans, profile
from tuner.record import RecordBuilder

T0 = 1_000.0
#: (phase, start, end, watts): a GPU's power, constant within each phase
#: (phase bounds on sample times: the counter is exact at its samples, linear between them)
PHASES = [("starting", 0.0, 1.3), ("warm-up", 1.3, 2.1), ("measuring", 2.1, 6.0), ("eval", 6.0, 7.2),
          ("measuring", 7.2, 9.0)]
WATTS = {"starting": 80.0, "warm-up": 350.0, "measuring": 610.0, "eval": 420.0}


def power_at(t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(t)
    for name, a, b in PHASES:
        out[(t >= a) & (t < b)] = WATTS[name]
    out[t >= PHASES[-1][2]] = WATTS[PHASES[-1][0]]  # the last sample, at the run's end
    return out


def counter_mj(t: np.ndarray) -> np.ndarray:
    """The energy counter (mJ) of the piecewise-constant power, exactly."""
    grid = np.linspace(0.0, 9.0, 90001)
    cum = np.concatenate([[0.0], np.cumsum((grid[1:] - grid[:-1]) * power_at(grid[:-1]))])
    return 5e6 + np.interp(t, grid, cum) * 1000.0


def record(hz: float = 10.0, gpus: int = 2) -> dict:
    b = RecordBuilder("r1", T0, {"workload": "command", "options": {}}, {"gpus": []})
    ts = np.arange(0.0, 9.0 + 1e-9, 1.0 / hz)
    for g in range(gpus):
        for t, mj, w in zip(ts, counter_mj(ts), power_at(ts), strict=True):
            b.add({"v": 1, "type": "energy", "t": T0 + float(t), "rank": -1, "gpu": g, "mj": float(mj) * (g + 1),
                   "uuid": f"GPU-{g}"})
            b.add({"v": 1, "type": "gpu", "t": T0 + float(t), "rank": -1, "gpu": g, "power_w": float(w) * (g + 1),
                   "sm_clock_mhz": 1980, "throttle_reasons": ["sw_power_cap"] if w > 600 else []})
    for name, a, _ in PHASES[1:]:
        b.add({"v": 1, "type": "phase", "t": T0 + a, "rank": 0, "phase": name})
    for i, t in enumerate(np.arange(1.5, 9.0, 0.5)):
        b.add({"v": 1, "type": "step", "t": T0 + float(t), "rank": 0, "step": i, "step_ms": 500.0, "tokens": 1000,
               "clock": "host", **({"first": True} if i == 0 else {})})
    return b.finish("ok", 0, T0 + 9.0)


def test_interpolation_and_integral_match_numpy():
    ts = [0.0, 1.0, 2.5, 4.0]
    ys = [0.0, 10.0, 4.0, 8.0]
    for t in (0.0, 0.3, 1.0, 2.2, 3.9, 4.0):
        assert interpolate(ts, ys, t) == pytest.approx(float(np.interp(t, ts, ys)))
    assert interpolate(ts, ys, -0.1) is None and interpolate(ts, ys, 4.1) is None
    fine = np.linspace(0.7, 3.3, 200001)
    assert integral(ts, ys, 0.7, 3.3) == pytest.approx(float(np.trapezoid(np.interp(fine, ts, ys), fine)), rel=1e-6)
    assert integral(ts, ys, 0.7, 4.5) is None


def test_phases_follow_the_lowest_rank_and_cover_the_run():
    events = [{"type": "phase", "t": 5.0, "rank": 1, "phase": "x"},
              {"type": "phase", "t": 3.0, "rank": 0, "phase": "eval"},
              {"type": "phase", "t": 4.0, "rank": 0, "phase": "measuring"}]
    assert phase_spans(events, 1.0, 9.0) == [("starting", 1.0, 3.0), ("eval", 3.0, 4.0), ("measuring", 4.0, 9.0)]
    assert phase_spans([], 1.0, 2.0) == [("starting", 1.0, 2.0)]


def test_energy_per_phase_equals_the_power_the_gpus_drew():
    rec = record()
    phases = rec["summary"]["phases"]
    assert [p["phase"] for p in phases] == [name for name, _, _ in PHASES]
    for p, (name, a, b) in zip(phases, PHASES, strict=True):
        truth = WATTS[name] * (b - a) * (1 + 2)  # GPU 1 draws twice GPU 0's power
        assert p["start_s"] == pytest.approx(a) and p["duration_s"] == pytest.approx(b - a)
        assert p["energy_j"] == pytest.approx(truth, rel=1e-6)
        assert p["power_w"] == pytest.approx(WATTS[name] * 3, rel=1e-6)
        # the integral of 10 Hz samples of a step function: it differs from the truth only within a sample
        # period of each edge, by at most the step there
        edges = sum(abs(WATTS[name] - WATTS[other]) for other, x, y in PHASES if x == b or y == a)
        assert abs(p["energy_integrated_j"] - truth) <= 0.1 * edges * 3 + 1e-6
    steps_t = np.arange(1.5, 9.0, 0.5)
    for p, (_, a, b) in zip(phases, PHASES, strict=True):
        n = int(((steps_t > a) & (steps_t <= b)).sum())
        assert p["steps"] == n
        assert p["tokens"] == (1000 * n if n else None)
        if n:
            assert p["joules_per_token"] == pytest.approx(p["energy_j"] / (1000 * n))
    total = sum(p["energy_j"] for p in phases)
    assert rec["summary"]["energy_j"] == pytest.approx(total, rel=1e-9)
    assert rec["summary"]["energy_integrated_j"] == pytest.approx(total, rel=0.02)


def test_phases_are_cut_to_the_readings_and_one_outside_them_has_no_energy():
    series = {"energy": {"0": {"t": [2.0, 3.0], "mj": [0.0, 1000.0]}},
              "gpu": {"0": {"t": [2.0, 3.0], "power_w": [1000.0, 1000.0]}}}
    events = [{"type": "phase", "t": 3.5, "rank": 0, "phase": "eval"}]
    first, outside = profile(series, events, 1.0, 5.0, ["0"], [])
    assert first["duration_s"] == 2.5 and first["energy_j"] == 1.0 and first["energy_integrated_j"] == 1000.0
    assert outside["phase"] == "eval" and outside["energy_j"] is None and outside["energy_integrated_j"] is None


def test_export_has_the_profile_by_phase_name_and_the_series():
    rec = record()
    totals = phase_totals(rec["summary"]["phases"])
    assert totals["measuring"]["duration_s"] == pytest.approx(3.9 + 1.8)
    assert totals["measuring"]["energy_j"] == pytest.approx(610 * 5.7 * 3, rel=1e-6)
    flat = {(r["metric"], r["statistic"]): r["value"] for r in rows(rec)}
    assert flat[("phase_energy_j", "eval")] == pytest.approx(420 * 1.2 * 3, rel=1e-6)
    assert flat[("phase_power_w", "measuring")] == pytest.approx(610 * 3, rel=1e-6)
    assert b'btune_phase_energy_joules{phase="eval",' in export([rec], "prometheus")
    table = list(csv.DictReader(io.StringIO(export_series([rec], "csv").decode())))
    power0 = [r for r in table if r["gpu"] == "0" and r["field"] == "power_w"]
    assert len(power0) == 91 and float(power0[30]["value"]) == pytest.approx(610.0)
    throttle = {r["value"] for r in table if r["field"] == "throttle_reasons"}
    assert throttle == {"", "sw_power_cap"}
    energy1 = [r for r in table if r["gpu"] == "1" and r["field"] == "energy_j"]
    assert float(energy1[-1]["value"]) == pytest.approx(sum(WATTS[n] * (b - a) for n, a, b in PHASES) * 2, rel=1e-6)
    with pytest.raises(ValueError, match="json or csv"):
        export_series([rec], "prometheus")
