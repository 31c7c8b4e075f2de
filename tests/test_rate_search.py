"""Rate sweeps and --find-max-rate (issue 20 part 4): `btune run serve --endpoint URL --request-rate 2,4` and
`--find-max-rate` against a real aiohttp server on 127.0.0.1 whose latency grows with load (this file run as a
program is the server); quick tests of the rate list, the search's sequence of rates, the per-segment curve
against an independent recomputation, and the refusals.

The server's knee: a request that arrives while more than ``LIMIT`` requests (itself included) arrived in the
last ``WINDOW`` seconds waits ``SLOW_S`` before its first token. Near-regular arrivals (burstiness 1000) of
``PROBE`` requests therefore all stay fast up to 8/s and some go slow from 12/s on.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from support import btune, record_of, refused, start_program_server

from tuner.serving import curve, max_rate, serving_summary
from workloads.client.rates import RateSearch, parse_rates, rate_text, search
from workloads.options import validate
from workloads.slo import GOOD_FRACTION, passes
from workloads.specs.serve import SERVE, load_checks

WINDOW, LIMIT, SLOW_S = 1.0, 10, 0.3
PROBE = 12  # requests per probe: enough for 12/s to cross the limit within one probe


# -- the server (this file as a program) -------------------------------------------------------------------------

def serve(port: int) -> None:
    """Serve /v1/completions on 127.0.0.1:``port`` until killed, slower under load (the module's docstring)."""
    import asyncio
    import time
    from collections import deque

    from aiohttp import web

    starts: deque[float] = deque()

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        now = time.monotonic()
        starts.append(now)
        while starts and starts[0] < now - WINDOW:
            starts.popleft()
        slow = len(starts) > LIMIT
        n = body.get("max_tokens", 1)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        if slow:
            await asyncio.sleep(SLOW_S)
        for _ in range(n):
            await resp.write(f"data: {json.dumps({'choices': [{'text': ' w'}]})}\n\n".encode())
            await asyncio.sleep(0.002)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


@pytest.fixture(scope="module")
def server():
    proc, url = start_program_server(__file__)
    yield url
    proc.kill()
    proc.wait()


def run(out: Path, url: str, *args: str) -> dict:
    res = btune("run", "serve", "--endpoint", url, "--model", "m", "--out", str(out), "--prompt-len", "fixed:4",
                "--output-len", "fixed:3", "--burstiness", "1000", "--slo-ttft-ms", "150", "--slo-tpot-ms", "1000",
                *args, timeout=300)
    rec = record_of(res)
    rec["_show"] = btune("show", res.stdout.strip().splitlines()[-1]).stdout
    return rec


def requests_of(rec: dict) -> list[dict]:
    return sorted((e for e in rec["events"] if e["type"] == "request"), key=lambda r: r["rid"])


def recomputed(reqs: list[dict], slo_ttft: float, slo_tpot: float) -> list[dict]:
    """Each segment's figures from the raw timestamps, by numpy, independently of tuner.serving."""
    out = []
    for k in sorted({r["segment"] for r in reqs}):
        seg = [r for r in reqs if r["segment"] == k]
        done = [r for r in seg if r["status"] == "finished"]
        ttft = [(r["token_s"][0] - r["arrival_s"]) * 1000 for r in done]
        tpot = [(r["finish_s"] - r["token_s"][0]) * 1000 / (r["output_tokens"] - 1) for r in done
                if r["output_tokens"] > 1]
        good = sum(1 for r, t in zip(done, ttft, strict=True)
                   if t <= slo_ttft and (r["output_tokens"] < 2
                                         or (r["finish_s"] - r["token_s"][0]) * 1000 / (r["output_tokens"] - 1)
                                         <= slo_tpot))
        span = max(r["finish_s"] for r in done) - min(r["arrival_s"] for r in seg)
        out.append({"segment": k, "rate": seg[0]["rate"], "requests": len(seg), "finished": len(done),
                    "request_throughput": len(done) / span,
                    "output_tokens_per_s": sum(r["output_tokens"] for r in done) / span,
                    "good_fraction": good / len(seg),
                    "ttft": [np.percentile(ttft, 50), np.percentile(ttft, 99)],
                    "tpot": [np.percentile(tpot, 50), np.percentile(tpot, 99)]})
    return out


def assert_curve_matches(points: list[dict], reqs: list[dict], slo_ttft: float, slo_tpot: float) -> None:
    want = recomputed(reqs, slo_ttft, slo_tpot)
    assert len(points) == len(want)
    for p, w in zip(points, want, strict=True):
        for key in ("segment", "rate", "requests", "finished"):
            assert p[key] == w[key], key
        for key in ("request_throughput", "output_tokens_per_s", "good_fraction"):
            assert p[key] == pytest.approx(w[key], rel=1e-9), key
        assert [p["ttft_ms"]["p50"], p["ttft_ms"]["p99"]] == pytest.approx(w["ttft"], rel=1e-9)
        assert [p["tpot_ms"]["p50"], p["tpot_ms"]["p99"]] == pytest.approx(w["tpot"], rel=1e-9)
        assert p["passed"] is (w["good_fraction"] >= 0.99)


# -- slow: the real CLI against the real server -------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_runs_one_segment_per_rate_in_order(server, tmp_path):
    rec = run(tmp_path, server, "--request-rate", "2,4", "--num-requests", "3")
    reqs = requests_of(rec)
    assert rec["status"] == "ok"
    assert [r["rid"] for r in reqs] == list(range(6))
    assert [(r["segment"], r["rate"]) for r in reqs] == [(0, 2.0)] * 3 + [(1, 4.0)] * 3
    assert all(r["status"] == "finished" and "search" not in r for r in reqs)
    first_end = max(r["finish_s"] for r in reqs if r["segment"] == 0)
    assert min(r["arrival_s"] for r in reqs if r["segment"] == 1) >= first_end  # one clock, one after the other
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["plan"]["load"]["request_rates"] == [2.0, 4.0]
    phases = [e.get("detail") for e in rec["events"] if e["type"] == "phase" and e["phase"] == "measuring"]
    assert phases == ["rate 2/s", "rate 4/s"]
    s = rec["summary"]["serving"]
    assert "max_rate" not in s and s["requests"]["total"] == 6
    assert_curve_matches(s["curve"], reqs, 150.0, 1000.0)
    assert [p["passed"] for p in s["curve"]] == [True, True]
    table = rec["_show"]
    assert "TTFT p99 ms" in table and "2.000/s" in table and "4.000/s" in table


@pytest.fixture(scope="module")
def searched(server, tmp_path_factory):
    """The record of one --find-max-rate run against the server: 4/s and 8/s pass, 16/s and 12/s fail."""
    return run(tmp_path_factory.mktemp("search"), server, "--find-max-rate", "--request-rate", "4",
               "--max-rate-steps", "4", "--num-requests", str(PROBE))


@pytest.mark.slow
def test_find_max_rate_doubles_then_bisects_to_the_knee(searched):
    rec = searched
    reqs = requests_of(rec)
    assert rec["status"] == "ok" and [r["rid"] for r in reqs] == list(range(4 * PROBE))
    assert all(r["search"] is True for r in reqs)
    s = rec["summary"]["serving"]
    assert [(p["rate"], p["passed"]) for p in s["curve"]] == [(4.0, True), (8.0, True), (16.0, False),
                                                               (12.0, False)]
    assert s["max_rate"] == 8.0
    assert_curve_matches(s["curve"], reqs, 150.0, 1000.0)
    # the workload decided with the same predicate: its own probes agree with the console's curve
    probes = rec["summary"]["workload"]["search"]["probes"]
    assert [(p["rate"], p["passed"]) for p in probes] == [(p["rate"], p["passed"]) for p in s["curve"]]
    assert "max rate with >= 99% of requests within the SLOs: 8.000 req/s" in rec["_show"]


# -- slow: the app's serving panel charts the curve -----------------------------------------------------------------

def curve_state(app) -> dict:
    """What the serving panel shows of the curve: whether its charts are shown, the points each chart drew as
    marks (pass and fail, by rate; drawn at a size, not only given), its rules, and its text."""
    from textual_plot.plot_widget import ScatterPlot

    from tuner.tui.widgets.latency import FAIL, PASS, LatencyPanel

    panel = app.screen.query_one(LatencyPanel)
    out = {"charted": panel.curve_box.display, "rows": panel.curve_rows.display and str(panel.curve_rows.content),
           "text": panel.text.plain}
    for name, chart in panel.curve_charts.items():
        drawn = [d for d in chart._datasets if isinstance(d, ScatterPlot)] if chart._drawn else []
        out[name] = {"pass": sorted(x for d in drawn if d.marker_style == PASS[0] for x in d.x),
                     "fail": sorted(x for d in drawn if d.marker_style == FAIL[0] for x in d.x),
                     "rules": [x for x, _ in chart.rules]}
    return out


def charted(app) -> bool:
    from tuner.tui.widgets.latency import LatencyPanel

    panel = app.screen.query_one(LatencyPanel)
    return panel.curve_box.display and all(c._drawn for c in panel.curve_charts.values())


@pytest.mark.slow
def test_the_app_charts_the_curve_in_replay_and_keeps_it_to_rows_when_narrow(searched):
    import asyncio

    from test_tui_support import make_app, recorded, until

    from tuner.tui.screens.replay import ReplayScreen

    async def shown(rec: dict, size: tuple[int, int], wait: bool = True) -> dict:
        app = make_app(Path("."))
        async with app.run_test(size=size) as pilot:
            await app.push_screen(ReplayScreen(rec, autoplay=False, at_end=True))
            await pilot.pause()
            if wait:
                await until(pilot, lambda: charted(app), 60, "the curve's charts")
            else:
                await pilot.pause(0.5)
            return curve_state(app)

    for size in ((120, 40), (80, 24)):
        state = asyncio.run(shown(searched, size))
        assert state["charted"], size
        # 4/s and 8/s within the SLOs, 12/s and 16/s not, on both charts (the latency chart marks TTFT and TPOT)
        assert state["rps"] == {"pass": [4.0, 8.0], "fail": [12.0, 16.0], "rules": [8.0]}
        assert state["ms"] == {"pass": [4.0, 4.0, 8.0, 8.0], "fail": [12.0, 12.0, 16.0, 16.0], "rules": [8.0]}
        assert "max rate 8.000 req/s" in state["text"]
        rows = state["rows"].splitlines()  # a row per load, in the order they ran, after a header
        assert len(rows) == 5 and "TTFT p99 ms" in rows[0]
        assert [r.split()[:2] for r in rows[1:]] == [["4.000/s", "●"], ["8.000/s", "●"], ["16.00/s", "×"],
                                                      ["12.00/s", "×"]]
    narrow = asyncio.run(shown(searched, (60, 30), wait=False))  # no room for two charts: the rows of bars
    assert not narrow["charted"] and not narrow["rows"]
    assert "throughput by offered rate" in narrow["text"] and "max rate 8.000 req/s" in narrow["text"]
    plain = asyncio.run(shown(recorded("synthetic"), (120, 40), wait=False))  # no curve: neither
    assert not plain["charted"] and not plain["rows"] and "rate" not in plain["text"]


@pytest.mark.slow
def test_the_app_charts_the_curve_live_as_its_loads_finish(searched):
    import asyncio

    from test_tui_support import DashboardApp, until

    from tuner.feed import RunFeed
    from tuner.replay import timeline
    from tuner.tui.widgets.dashboard import Dashboard

    async def body() -> None:
        app = DashboardApp()
        async with app.run_test(size=(120, 40)) as pilot:
            feed, dash = RunFeed(), app.query_one(Dashboard)
            events = timeline(searched)
            third = next(i for i, e in enumerate(events) if e["type"] == "request" and e["segment"] == 2)
            for ev in events[:third + 1]:  # the first two loads (4/s and 8/s) have run, the third has begun
                feed(ev)
            view = feed.view()
            # the screens redraw at their refresh rate (a panel's first draw comes before the layout sized it)
            await until(pilot, lambda: dash.show(view) or charted(app), 60, "the curve's charts, live")
            state = curve_state(app)
            assert state["rps"] == {"pass": [4.0, 8.0], "fail": [], "rules": [8.0]}
            for ev in events[third + 1:]:
                feed(ev)
            feed.finish(searched["summary"])
            view = feed.view()
            await until(pilot, lambda: dash.show(view) or curve_state(app)["rps"]["fail"] == [12.0, 16.0], 60,
                        "the whole curve")
            assert curve_state(app)["rps"] == {"pass": [4.0, 8.0], "fail": [12.0, 16.0], "rules": [8.0]}

    asyncio.run(body())


# -- quick --------------------------------------------------------------------------------------------------------

def test_rates_parse_in_order_with_inf():
    assert parse_rates("1,2,4,8") == [1.0, 2.0, 4.0, 8.0]
    assert parse_rates(" 0.5 , inf,3") == [0.5, math.inf, 3.0]
    assert parse_rates("4") == [4.0]
    assert [rate_text(r) for r in (2.0, 0.5, math.inf, None)] == ["2", "0.5", "inf", "inf"]


@pytest.mark.parametrize(("text", "words"), [
    ("", "'' is not a number"), ("a", "'a' is not a number"), ("1,,2", "'' is not a number"),
    ("0", "'0' is out of range: a request rate must be > 0"), ("2,-1", "'-1' is out of range"),
    ("nan", "'nan' is out of range"),
])
def test_bad_rates_are_one_line(text, words):
    with pytest.raises(ValueError, match=r"^--request-rate: ") as exc:
        parse_rates(text)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def checks(**values: object) -> list[str]:
    return [why for _, why in load_checks(validate(SERVE, values))]


def test_sweeps_and_searches_are_refused_where_they_cannot_run(capsys):
    url = {"endpoint": "http://127.0.0.1:9/v1", "model": "m"}
    assert checks(request_rate="1,2") == ["--request-rate 1,2: several rates (a sweep) apply to --endpoint; "
                                          "btune's engine takes one rate"]
    assert checks(request_rate="1,2", **url) == []
    assert checks(request_rate="inf", **url) == []
    assert checks(find_max_rate=True, **url) == []
    assert checks(find_max_rate=True, burstiness=4.0, **url) == []
    assert "drop --concurrency" in checks(find_max_rate=True, concurrency=4, **url)[-1]
    assert "one finite --request-rate, not 1,2" in checks(find_max_rate=True, request_rate="1,2", **url)[0]
    assert "one finite --request-rate, not inf" in checks(find_max_rate=True, request_rate="inf", **url)[0]
    assert "drop --duration" in checks(find_max_rate=True, duration=5.0, **url)[0]
    assert "--find-max-rate applies to --endpoint" in checks(find_max_rate=True)[0]
    line = refused(capsys, ["run", "serve", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m",
                            "--request-rate", "1,x"])
    assert "--request-rate: 'x' is not a number" in line


def test_the_search_doubles_then_bisects():
    # capacity 5/s: 1 2 4 pass, 8 fails, then halfway between the last pass and the first fail
    s = search(1.0, 6, lambda r: r <= 5)
    assert s.probes == [(1, True), (2, True), (4, True), (8, False), (6, False), (5, True)]
    assert s.best == 5
    # the start already fails: bisect down from 0
    s = search(1.0, 6, lambda r: r <= 0.3)
    assert [r for r, _ in s.probes] == [1, 0.5, 0.25, 0.375, 0.3125, 0.28125] and s.best == 0.28125
    # never fails: doubling to the bound
    assert [r for r, _ in search(3.0, 4, lambda r: True).probes] == [3, 6, 12, 24]
    assert search(2.0, 1, lambda r: False).probes == [(2, False)] and search(2.0, 1, lambda r: False).best is None
    with pytest.raises(ValueError, match="finite rate"):
        RateSearch(math.inf)


def record(seg: int | None, rate: float | None, arrival: float, ttft_ms: float, n: int = 3,
           status: str = "finished", search_: bool = False) -> dict:
    """A request record as the endpoint load writes it: tokens every 10 ms after the first."""
    first = arrival + ttft_ms / 1000
    tokens = [first + i * 0.01 for i in range(n)] if status != "failed" else []
    done = status == "finished"
    rec = {"rid": 0, "replica": 0, "client": None, "finished": done, "status": status, "prompt_len": 4,
           "output_len": n, "output_tokens": len(tokens), "arrival_s": arrival,
           "first_token_s": tokens[0] if tokens else None, "finish_s": tokens[-1] if done else None,
           "token_s": tokens, "ttft_ms": ttft_ms if tokens else None,
           "tpot_ms": 10.0 if done and n > 1 else None, "e2e_ms": (tokens[-1] - arrival) * 1000 if done else None}
    if seg is not None:
        rec.update(segment=seg, rate=rate, **({"search": True} if search_ else {}))
    return rec


def test_the_curve_per_segment_against_a_recomputation():
    recs = [record(0, 2.0, 0.0, 50), record(0, 2.0, 0.5, 60), record(0, 2.0, 1.0, 70, n=1),
            record(1, 4.0, 1.5, 80), record(1, 4.0, 1.75, 400), record(1, 4.0, 2.0, 0, status="failed"),
            record(1, 4.0, 2.25, 90, status="unfinished")]
    points = curve(recs, 100.0, 50.0)
    assert [(p["segment"], p["rate"], p["requests"], p["finished"], p["failed"], p["unfinished"])
            for p in points] == [(0, 2.0, 3, 3, 0, 0), (1, 4.0, 4, 2, 1, 1)]
    # segment 0: arrivals 0..1.0, last end 1.0 + 70 ms; segment 1: from 1.5 to the unfinished one's last token
    assert points[0]["duration_s"] == pytest.approx(1.07)
    assert points[1]["duration_s"] == pytest.approx(2.25 + 0.09 + 0.02 - 1.5)
    assert points[0]["request_throughput"] == pytest.approx(3 / 1.07)
    assert points[1]["output_tokens_per_s"] == pytest.approx(6 / 0.86)
    assert points[0]["good_fraction"] == 1.0 and points[0]["passed"]
    assert points[1]["good_fraction"] == 0.25 and not points[1]["passed"]
    assert points[0]["ttft_ms"]["p50"] == pytest.approx(60.0)
    assert points[0]["ttft_ms"]["p99"] == pytest.approx(float(np.percentile([50, 60, 70], 99)))
    assert points[1]["tpot_ms"] == {"p50": 10.0, "p99": 10.0}
    # the passing mark is the workload's own predicate (one implementation)
    assert [passes([r for r in recs if r["segment"] == k], 100.0, 50.0) for k in (0, 1)] == [True, False]
    assert GOOD_FRACTION == 0.99
    assert max_rate(points) == 2.0


def test_the_summary_has_a_curve_only_with_segments_and_a_max_rate_only_when_searched():
    plain = [record(None, None, 0.0, 50), record(None, None, 0.5, 60)]
    assert "curve" not in serving_summary(plain, 1.0, 100.0, 50.0)
    swept = [record(0, 2.0, 0.0, 50), record(1, 4.0, 0.5, 60)]
    s = serving_summary(swept, 1.0, 100.0, 50.0)
    assert len(s["curve"]) == 2 and "max_rate" not in s
    searched = [record(0, 2.0, 0.0, 50, search_=True), record(1, 4.0, 0.5, 500, search_=True)]
    assert serving_summary(searched, 1.0, 100.0, 50.0)["max_rate"] == 2.0
    none_pass = [record(0, 2.0, 0.0, 500, search_=True)]
    assert serving_summary(none_pass, 1.0, 100.0, 50.0)["max_rate"] is None


def test_console_and_workload_share_the_slo_predicate():
    import tuner.serving
    import workloads.slo

    assert tuner.serving.meets_slo is workloads.slo.meets_slo


def test_the_app_draws_the_curve_as_bars_coloured_by_the_slos():
    from tuner.tui.widgets.latency import curve_lines

    points = [{"rate": 2.0, "request_throughput": 2.0, "good_fraction": 1.0, "passed": True, "ttft_ms": {"p99": 5}},
              {"rate": 8.0, "request_throughput": 4.0, "good_fraction": 0.5, "passed": False, "ttft_ms": {"p99": 300}}]
    lines = curve_lines(points, 100)
    assert len(lines) == 3 and curve_lines(None, 100) == []
    bars = [line.plain.count("█") for line in lines[1:]]
    assert bars[1] == 2 * bars[0] > 0  # proportional to request throughput
    styles = [{str(span.style) for span in line.spans} for line in lines[1:]]
    assert styles == [{"green"}, {"red"}]
    assert "8.000/s" in lines[2].plain and "50.0% within SLOs" in lines[2].plain



def test_the_app_charts_throughput_and_p99_latency_against_the_offered_rate():
    from tuner.tui.widgets.latency import FAIL, PASS, RULE, curve_legend, curve_rows, curve_series

    points = [{"rate": 8.0, "request_throughput": 7.5, "passed": True, "ttft_ms": {"p99": 20}, "tpot_ms": {"p99": 5}},
              {"rate": 2.0, "request_throughput": 2.0, "passed": True, "ttft_ms": {"p99": 10}, "tpot_ms": {"p99": 4}},
              {"rate": None, "request_throughput": 9.0, "passed": False, "ttft_ms": {"p99": None},
               "tpot_ms": {"p99": 9}}]
    (lines, marks, rules, _), (ms_lines, ms_marks, ms_rules, _) = curve_series(points, 8.0)
    offered, got = lines
    assert offered.xs == offered.ys == (0.0, 8.0)  # the diagonal up to the highest finite rate
    assert got.xs == (2.0, 8.0, math.inf) and got.ys == (2.0, 7.5, 9.0)  # by rate, all at once last
    assert [(m.style, m.char, m.xs) for m in marks] == [(*PASS, (2.0, 8.0)), (*FAIL, (math.inf,))]
    assert rules == ms_rules == [(8.0, RULE)] and curve_series(points, None)[0][2] == []
    ttft, tpot = ms_lines
    assert ttft.xs == (2.0, 8.0) and tpot.ys == (4.0, 5.0, 9.0)  # no TTFT p99 all at once: no point there
    assert [m.xs for m in ms_marks] == [(2.0, 8.0), (), (2.0, 8.0), (math.inf,)]
    rows = [line.plain for line in curve_rows(points, 76)]
    assert "out tok/s" in rows[0] and [r.split()[:2] for r in rows[1:]] == [["8.000/s", "●"], ["2.000/s", "●"],
                                                                          ["inf", "×"]]
    assert all(len(r) <= 76 for r in rows) and "out tok/s" not in curve_rows(points, 60)[0].plain
    assert "max rate 8.000 req/s" in curve_legend({"max_rate": 8.0}, 76)[0].plain
    assert "max rate" not in "".join(t.plain for t in curve_legend({}, 76))  # a sweep: no max rate


if __name__ == "__main__":
    serve(int(sys.argv[1]))

