"""The live panels read the console's implementations: the serving block (ITL, goodput) from raw request
events, energy of the run's GPUs only and J/token over steady steps only, expert balance computed from the
window's counts. Panels are rendered from a RunFeed fed by hand (no app, no process)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tuner.feed import RunFeed
from tuner.protocol import make_event
from tuner.tui.widgets.experts import ExpertsPanel
from tuner.tui.widgets.latency import LatencyPanel, live_block
from tuner.tui.widgets.power import PowerPanel, energy_so_far, joules_per_token


def text(panel, feed) -> str:
    """The panel's lines for the feed, and the note on its border."""
    lines = [line.plain for line in panel.render_view(feed.view(), 120)]
    return "\n".join([*lines, str(panel.border_subtitle or "")])


def _request(rid: int, arrival: float, gaps: list[float], ttft: float) -> dict:
    tokens = [arrival + ttft]
    for g in gaps:
        tokens.append(tokens[-1] + g)
    e2e = (tokens[-1] - arrival) * 1000
    return make_event("request", rank=0, rid=rid, replica=0, finished=True, prompt_len=10, output_len=len(tokens),
                      output_tokens=len(tokens), arrival_s=arrival, first_token_s=tokens[0], finish_s=tokens[-1],
                      token_s=tokens, ttft_ms=ttft * 1000, tpot_ms=(e2e - ttft * 1000) / (len(tokens) - 1),
                      e2e_ms=e2e)


def test_latency_panel_shows_itl_and_goodput_under_the_runs_slos():
    feed = RunFeed()
    feed(make_event("meta", rank=0, workload="serve", options={"slo_ttft_ms": 100.0, "slo_tpot_ms": 20.0}))
    rng = np.random.default_rng(3)
    reqs = [_request(i, 0.1 * i, list(rng.uniform(0.005, 0.03, 6)), float(rng.uniform(0.01, 0.2)))
            for i in range(30)]
    for r in reqs:
        feed(r)
    block = live_block(feed.view())
    gaps = [(b - a) * 1000 for r in reqs for a, b in zip(r["token_s"], r["token_s"][1:], strict=False)]
    assert block["itl_ms"]["p50"] == pytest.approx(float(np.percentile(gaps, 50)))
    good = sum(r["ttft_ms"] <= 100 and r["tpot_ms"] <= 20 for r in reqs)
    assert 0 < good < 30
    assert block["goodput"] == pytest.approx(good / max(r["finish_s"] for r in reqs))
    shown = text(LatencyPanel(), feed)
    assert "ITL" in shown and "goodput" in shown and "TTFT" in shown and "SLOs TTFT <= 100.0 ms" in shown
    assert f"{block['goodput']:.3f}" in shown


def test_failed_endpoint_requests_count_live_as_in_the_record():
    feed = RunFeed()
    feed(make_event("meta", rank=0, workload="serve", options={"slo_ttft_ms": 100.0, "slo_tpot_ms": 20.0}))
    for i in range(4):
        feed(_request(i, 0.1 * i, [0.01, 0.01], 0.05))
    for rid, error in ((4, "HTTP 500: boom"), (5, "timeout: after 1.0 s"), (6, "HTTP 500: again")):
        feed(make_event("request", rank=0, rid=rid, replica=0, finished=False, prompt_len=10, output_len=3,
                        output_tokens=0, arrival_s=0.5, first_token_s=None, finish_s=None, token_s=[],
                        ttft_ms=None, tpot_ms=None, e2e_ms=None, status="failed", error=error))
    block = live_block(feed.view())
    assert block["requests"]["finished"] == 4 and block["requests"]["unfinished"] == 0
    assert block["failures"] == {"total": 3, "by_reason": {"HTTP 500": 2, "timeout": 1}}
    assert "(3 failed)" in text(LatencyPanel(), feed)


def _energy(gpu: int, t: float, mj: float, uuid: str | None = None) -> dict:
    ev = make_event("energy", rank=-1, gpu=gpu, mj=mj)
    ev["t"] = t
    if uuid:
        ev.update(uuid=uuid, mig=False)
    return ev


def _step(i: int, t: float, tokens: int, warmup: bool) -> dict:
    ev = make_event("step", rank=0, step=i, step_ms=10.0, tokens=tokens, warmup=warmup, first=i == 0)
    ev["t"] = t
    return ev


def test_power_panel_counts_the_runs_gpu_and_no_warm_up_joules():
    feed = RunFeed()
    uuids = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4)]
    for g in range(4):
        feed(_energy(g, 0.0, 0.0, uuids[g]))
    feed(make_event("meta", rank=0, workload="dense", device_uuid=uuids[2][4:]))  # torch's spelling: no GPU-
    feed(_step(0, 0.5, 100, True))
    for g in range(4):
        feed(_energy(g, 1.0, 1000.0 * (g + 1)))  # 1, 2, 3, 4 J
    assert energy_so_far(feed.view()) == pytest.approx(3.0)  # GPU 2 only
    assert joules_per_token(feed.view()) is None
    assert "(warm-up)" in text(PowerPanel(), feed)
    feed(_step(1, 1.2, 100, False))  # the first steady step: the baseline is the readings so far
    for g in range(4):
        feed(_energy(g, 2.0, 1000.0 * (g + 1) + 500.0 * (g + 1)))  # GPU 2: +1.5 J
    feed(_step(2, 2.1, 300, False))
    assert joules_per_token(feed.view()) == pytest.approx(1.5 / 300)
    shown = text(PowerPanel(), feed)
    assert "energy counts GPU 2 (the run's)" in shown


def test_experts_panel_computes_balance_from_the_counts():
    feed = RunFeed()
    counts = [[10, 10, 10, 10], [40, 0, 0, 0]]
    feed(make_event("experts", rank=0, step=3, window=[0, 3], steps=4, layer_ids=[1, 3], n_experts=4, top_k=1,
                    counts=counts, dropped=[0, 4], gini=[0.99, 0.99], mean={"gini": 0.99}))
    figs = feed.view().experts_figures
    assert figs["gini"] == [pytest.approx(0.0), pytest.approx(0.75)]  # not the event's own 0.99
    assert figs["mean"]["gini"] == pytest.approx(0.375) and figs["max"]["dead"] == 3
    shown = text(ExpertsPanel(), feed)
    assert "gini 0.375 (max 0.75" in shown and "0.99" not in shown


# -- the live screen's layout: time charts, folded GPUs, a latency panel that fits 80 columns, the log ---------

def test_chart_axes_ticks_and_labels():
    from tuner.tui.widgets.chart import si_label, thin, time_label, time_ticks, value_ticks

    assert [time_label(s) for s in (0, 45, 60, 150, 3600, 5400)] == ["0s", "45s", "1m", "2m30", "1h", "1h30"]
    assert [si_label(v) for v in (0, 0.25, 950, 47_500, 1.2e6)] == ["0", "0.25", "950", "47.5k", "1.2M"]
    assert all(len(si_label(v)) <= 6 for v in (1e-4, 123.456, 99_999, 123_456_789))
    lo, hi, ticks = value_ticks(0.0, 54_266.0, 4)
    assert (lo, hi) == (0.0, 60_000.0) and ticks == [0.0, 20_000.0, 40_000.0, 60_000.0]
    assert value_ticks(0.0, 300.0, 1) == (0.0, 300.0, [0.0, 300.0])  # a chart two rows high: the ends only
    assert time_ticks(0.0, 7.0, 4) == (0.0, 7.0, [0.0, 2.0, 4.0, 6.0])
    assert time_ticks(30.0, 600.0, 5)[2] == [120.0, 240.0, 360.0, 480.0, 600.0]
    xs, ys = thin(list(range(1000)), list(range(1000)), 100)
    assert len(xs) <= 101 and xs[0] == 0 and xs[-1] == 999 and xs == ys


def _gpus(feed: RunFeed, n: int, rounds: int = 3) -> None:
    for r in range(rounds):
        for g in range(n):
            ev = make_event("gpu", rank=-1, gpu=g, power_w=300.0 + 10 * g, mem_used_mb=10240.0 * (1 + g % 2),
                            mem_total_mb=81920.0, util_gpu=90.0, sm_clock_mhz=1980.0, temp_c=60.0 + g)
            ev["t"] = float(r)
            feed(ev)


def test_many_gpus_fold_into_one_line_until_expanded():
    from tuner.tui.widgets.gpu import GpuPanel
    from tuner.tui.widgets.gpu_rows import gpu_series
    from tuner.tui.widgets.memory import MemoryPanel

    feed = RunFeed()
    _gpus(feed, 8)
    view = feed.view()
    for panel in (PowerPanel(), MemoryPanel(), GpuPanel()):
        folded = [line.plain for line in panel.render_view(view, 76)]
        assert not any(line.startswith("gpu3") for line in folded) and "8 GPUs" in folded[0]
        panel.gpu_rows = True
        expanded = "\n".join(line.plain for line in panel.render_view(view, 76))
        assert all(f"gpu{g}" in expanded for g in range(8))
    assert "mean 335.0 · max 370.0 W" in text(PowerPanel(), feed)
    assert "util 90% · SM 1980 MHz · 60–67 C" in text(GpuPanel(), feed)
    mean, top = gpu_series(view, "power_w", expanded=False)  # folded charts: the mean and the highest GPU
    assert mean.ys == (335.0,) * 3 and top.ys == (370.0,) * 3 and mean.xs == (0.0, 1.0, 2.0)
    assert len(gpu_series(view, "power_w", expanded=True)) == 8
    few = RunFeed()
    _gpus(few, 2)
    assert "gpu1" in text(PowerPanel(), few) and len(gpu_series(few.view(), "power_w", expanded=False)) == 2


def test_latency_panel_fits_80_columns():
    feed = RunFeed()
    feed(make_event("meta", rank=0, workload="serve", options={"slo_ttft_ms": 100.0, "slo_tpot_ms": 20.0}))
    rng = np.random.default_rng(5)
    for i in range(50):
        feed(_request(i, 0.1 * i, list(rng.uniform(0.005, 3.0, 6)), float(rng.uniform(0.01, 9.0))))
    panel = LatencyPanel()
    lines = [line.plain for line in panel.render_view(feed.view(), 76)]  # 80 columns less border and padding
    assert all(len(line) <= 76 for line in lines), lines
    head = lines[0].split()
    assert head[:4] == ["ms", "p50", "p90", "p99"]
    assert [line.split()[0] for line in lines[1:5]] == ["TTFT", "TPOT", "ITL", "E2E"]
    assert any("goodput" in line for line in lines) and "SLOs TTFT <= 100.0 ms" in str(panel.border_subtitle)


def test_throughput_panel_says_the_window_and_mfu_then_the_run():
    from tuner.tui.widgets.throughput import ThroughputPanel

    feed = RunFeed()
    feed(make_event("meta", rank=0, workload="dense", device_name="NVIDIA H100 80GB HBM3", n_devices=1,
                    flops_per_token=1e6))
    for i in range(12):
        feed(_step(i, 0.5 * i, 100_000, i < 2))
    shown = text(ThroughputPanel(), feed)
    assert "last 10 steady " in shown and "MFU bf16 1.0% of" in shown
    feed.finish({"throughput_tokens_per_s": 9.9e6, "step_ms": {"p50": 10.0, "p90": 11.0, "p99": 12.0, "cv": 0.1},
                 "mfu": {"bf16": {"value": 0.01, "peak_tflops": 989.0}}})
    shown = text(ThroughputPanel(), feed)
    assert "run " in shown and "p50/p90/p99 " in shown and "cv " in shown and "MFU bf16 1.0% of" in shown


@pytest.mark.slow
def test_log_keeps_to_a_line_until_the_program_writes_and_panels_redraw_only_on_change():
    from test_tui_support import DashboardApp

    from tuner.tui.widgets.dashboard import Dashboard
    from tuner.tui.widgets.log import LogPanel
    from tuner.tui.widgets.throughput import ThroughputPanel

    async def body() -> None:
        app = DashboardApp()
        async with app.run_test(size=(120, 40)) as pilot:
            feed = RunFeed()
            dash = app.query_one(Dashboard)
            log = app.query_one(LogPanel)
            feed.add_line("note", "NVML unavailable")
            feed.add_line("note", "record: runs/x.json")
            dash.show(feed.view())
            await pilot.pause()
            assert log.size.height == 1 and log.outer_size.height == 2  # a rule and the newest note
            for i in range(30):
                feed.add_line("stderr", f"Traceback line {i}")
            dash.show(feed.view())
            await pilot.pause()
            assert log.size.height == 40 // 4  # grown: a quarter of the screen
            panel = app.query_one(ThroughputPanel)
            drawn = []
            original = panel.render_view
            panel.render_view = lambda view, width: drawn.append(1) or original(view, width)  # type: ignore[method-assign]
            for i in range(3):
                feed(_step(i, float(i), 1000, False))
            dash.show(feed.view())
            dash.show(feed.view())  # nothing new: no redraw
            feed.add_line("note", "a note is not a step")
            dash.show(feed.view())
            assert len(drawn) == 1

    asyncio.run(body())
