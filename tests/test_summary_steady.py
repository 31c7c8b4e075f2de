"""Steady-state statistics never include the first step (compilation), whatever --warmup is (issue 15, item 5)."""

from tuner.record import RecordBuilder
from tuner.tui.widgets.throughput import window_throughput


def step(i: int, ms: float, **kw) -> dict:
    return {"v": 1, "type": "step", "t": 100.0 + i, "rank": 0, "step": i, "step_ms": ms, "tokens": 1000, **kw}


def test_warmup_zero_keeps_the_compile_step_out_of_steady_statistics():
    b = RecordBuilder("w0", 99.0, {}, {})
    b.add(step(0, 1756.0, warmup=False, first=True))  # --warmup 0 --compile-mode default: the compile step
    for i in range(1, 6):
        b.add(step(i, 160.0, warmup=False))
    s = b.finish("ok", 0, 106.0)["summary"]
    assert s["steps"] == {"total": 6, "warmup": 1, "steady": 5}
    assert s["step_ms"]["mean"] == 160.0 and s["step_ms"]["max"] == 160.0
    assert s["throughput_tokens_per_s"] == 1000 / 0.160
    assert s["warmup_step_ms"] == [1756.0]


def test_the_live_throughput_window_leaves_the_first_step_out_too():
    steps = [step(0, 1756.0, warmup=False, first=True)] + [step(i, 160.0, warmup=False) for i in range(1, 4)]
    rate, n = window_throughput(steps)
    assert n == 3 and rate == 1000 / 0.160
