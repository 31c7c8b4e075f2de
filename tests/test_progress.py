"""Phases and progress from events (tuner.progress): bounded by steps, duration or requests, with an ETA;
unbounded runs show only their phase; runs without phase events follow their steps."""

from __future__ import annotations

import pytest

from tuner.progress import Progress, Tracker, duration_text


def ev(type_: str, t: float, **fields) -> dict:
    return {"v": 1, "type": type_, "t": t, "rank": fields.pop("rank", 0), **fields}


def test_phases_then_steps_bounded_by_steps():
    tr = Tracker({"steps": 10})
    assert tr.progress(0.0) == Progress("starting")
    tr(ev("phase", 1.0, phase="building"))
    tr(ev("phase", 2.0, phase="compiling", detail="bucket", k=3, n=8))
    assert tr.progress(2.5).text() == "compiling (bucket 3 of 8)"
    tr(ev("step", 10.0, step=0, step_ms=500.0, warmup=True, first=True))
    assert tr.progress(10.0).phase == "warm-up"
    tr(ev("phase", 10.0, phase="measuring"))
    for i in range(1, 5):  # four steady steps, one second each, the second rank's copies ignored
        tr(ev("step", 10.0 + i, step=i, step_ms=1000.0, warmup=False))
        tr(ev("step", 10.0 + i, step=i, step_ms=1000.0, warmup=False, rank=1))
    p = tr.progress(14.0)
    assert p.phase == "measuring" and p.fraction == pytest.approx(0.4) and p.eta_s == pytest.approx(6.0)
    assert p.text(10) == "measuring [####......] 40% ETA 6s"


def test_duration_bound_and_requests_bound():
    tr = Tracker({"duration": 20.0, "steps": 0})
    tr(ev("phase", 5.0, phase="measuring"))
    p = tr.progress(10.0)
    assert p.fraction == pytest.approx(0.25) and p.eta_s == pytest.approx(15.0)
    assert tr.progress(40.0).fraction == 1.0 and tr.progress(40.0).eta_s == 0.0
    serve = Tracker({"num_requests": 8, "duration": 0})
    serve(ev("phase", 0.0, phase="measuring"))
    for i in range(6):
        serve(ev("request", 1.0 + i, rid=i, finished=i % 2 == 0))
    assert serve.progress(6.0).fraction == pytest.approx(3 / 8)


def test_unbounded_and_phaseless_runs():
    tr = Tracker({})  # options arrive with the meta event
    tr(ev("meta", 0.5, options={"steps": 0, "duration": 0}))
    tr(ev("step", 1.0, step=0, step_ms=10.0, warmup=True, first=True))
    assert tr.progress(1.0) == Progress("warm-up")
    tr(ev("step", 2.0, step=1, step_ms=10.0, warmup=False))
    assert tr.progress(2.0) == Progress("measuring")  # no bound: no bar, no ETA


def test_duration_text():
    assert [duration_text(x) for x in (0.4, 45, 187, 7500, None)] == ["0s", "45s", "3m07s", "2h05m", "-"]
