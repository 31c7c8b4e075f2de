"""The live panels read the console's implementations: the serving block (ITL, goodput) from raw request
events, energy of the run's GPUs only and J/token over steady steps only, expert balance computed from the
window's counts. Panels are rendered from a RunFeed fed by hand (no app, no process)."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.feed import RunFeed
from tuner.protocol import make_event
from tuner.tui.widgets.experts import ExpertsPanel
from tuner.tui.widgets.latency import LatencyPanel, live_block
from tuner.tui.widgets.power import PowerPanel, energy_so_far, joules_per_token


def text(panel, feed) -> str:
    return "\n".join(line.plain for line in panel.render_view(feed.view(), 120))


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
