"""The serving summary: design.md's definitions, and percentiles equal to tuner.stats on the recorded values."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.serving import itl_ms, peak_concurrency, serving_summary
from tuner.stats import describe as stats_describe
from workloads.engine.request import timeline


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), k


@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000), st.none(), st.just(math.nan)),
                max_size=60))
@settings(max_examples=200, deadline=None)
def test_describe_equals_numpy(values):
    """tuner.stats.describe against numpy's linear percentiles and sample stdev, written out here."""
    xs = np.array([float(v) for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    got = stats_describe(values)
    if xs.size == 0:
        assert got["n"] == 0 and got["mean"] is None and got["p50"] is None
        return
    # the mean summed exactly (numpy's sum cancels 1e-141 + 1 - 1 to 0, which cv would divide by)
    want = {"n": int(xs.size), "mean": math.fsum(xs) / xs.size, "min": float(xs.min()), "max": float(xs.max()),
            "stdev": float(xs.std(ddof=1)) if xs.size > 1 else 0.0,
            **{f"p{p}": float(np.percentile(xs, p)) for p in (50, 90, 95, 99)}}
    want["cv"] = want["stdev"] / want["mean"] if want["mean"] else None
    _same(got, want)


@st.composite
def records(draw):
    out = []
    for rid in range(draw(st.integers(0, 25))):
        arrival = draw(st.floats(0, 100))
        n = draw(st.integers(0, 12))
        gaps = draw(st.lists(st.floats(1e-4, 2.0), min_size=n, max_size=n))
        ts, t = [], arrival + draw(st.floats(0, 5))
        for g in gaps:
            t += g
            ts.append(t)
        want = draw(st.integers(max(n, 1), 14))
        finish = ts[-1] if ts and len(ts) == want else None
        out.append(timeline(rid, arrival, ts, finish, draw(st.integers(1, 50)), want))
    return out


@given(records())
@settings(max_examples=150, deadline=None)
def test_summary_percentiles_equal_tuner_stats_on_the_records(recs):
    s = serving_summary(recs, 10.0, 1000.0, 100.0)
    done = [r for r in recs if r["finished"]]
    _same(s["ttft_ms"], stats_describe(r["ttft_ms"] for r in done))
    _same(s["tpot_ms"], stats_describe(r["tpot_ms"] for r in done))
    _same(s["e2e_ms"], stats_describe(r["e2e_ms"] for r in done))
    _same(s["itl_ms"], stats_describe(x for r in done for x in itl_ms(r)))
    assert s["requests"]["finished"] + s["requests"]["unfinished"] == len(recs)
    assert s["output_tokens_per_s"] == pytest.approx(sum(r["output_tokens"] for r in done) / 10.0)


def test_definitions_by_hand():
    # arrival 1.0; tokens at 1.5, 1.6, 1.8, 2.1; finish 2.1
    r = timeline(0, 1.0, [1.5, 1.6, 1.8, 2.1], 2.1, prompt_len=10, output_len=4)
    assert r["ttft_ms"] == pytest.approx(500.0)
    assert r["e2e_ms"] == pytest.approx(1100.0)
    assert r["tpot_ms"] == pytest.approx(600.0 / 3)
    assert itl_ms(r) == pytest.approx([100.0, 200.0, 300.0])
    one = timeline(1, 0.0, [0.2], 0.2, prompt_len=3, output_len=1)
    assert one["tpot_ms"] is None and one["ttft_ms"] == pytest.approx(200.0) and itl_ms(one) == []


def test_goodput_and_unfinished_requests():
    recs = [
        timeline(0, 0.0, [0.1, 0.15], 0.15, 5, 2),   # ttft 100, tpot 50: good
        timeline(1, 0.0, [3.0, 3.05], 3.05, 5, 2),   # ttft 3000: misses the TTFT SLO
        timeline(2, 0.0, [0.1, 0.4], 0.4, 5, 2),     # tpot 300: misses the TPOT SLO
        timeline(3, 0.0, [0.2], 0.2, 5, 1),          # one token: no TPOT, good
        timeline(4, 1.0, [1.1], None, 5, 3),         # unfinished, started
        timeline(5, 2.0, [], None, 5, 3),            # unfinished, still queued
    ]
    s = serving_summary(recs, 4.0, slo_ttft_ms=2000.0, slo_tpot_ms=100.0)
    assert s["requests"] == {"total": 6, "finished": 4, "unfinished": 2, "unfinished_started": 1, "good": 2}
    assert s["goodput"] == pytest.approx(2 / 4.0) and s["request_throughput"] == pytest.approx(4 / 4.0)
    assert s["ttft_ms"]["n"] == 4 and s["tpot_ms"]["n"] == 3
    assert s["output_tokens"] == 7 and s["tokens_generated"] == 8
    assert s["peak_concurrency"] == 4  # 0..3 at t=0; by t=1.0 only request 1 is left, then 4 and 5 join


def test_peak_concurrency_back_to_back_requests_do_not_overlap():
    recs = [{"arrival_s": 0.0, "finish_s": 1.0}, {"arrival_s": 1.0, "finish_s": 2.0},
            {"arrival_s": 0.5, "finish_s": None}]
    assert peak_concurrency(recs) == 2
    assert serving_summary([], 0.0, 1.0, 1.0)["request_throughput"] is None
