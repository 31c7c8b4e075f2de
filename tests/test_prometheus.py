"""The live --metrics-port endpoint, btune export --format prometheus, and a real Prometheus scraping a run."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import btune, free_port, refused, start_btune, wait_until
from tuner import replay
from tuner.export import export
from tuner.feed import RunFeed
from tuner.prom import LiveCollector, live_summary
from tuner.runs import load_record
from tuner.summary import is_steady, merged_steps

DATA = Path(__file__).parent / "data" / "runs"
GPU_RUN = DATA / "20261121-063452-dense-504a.json"  # an H200 run: GPU samples, energy counter, MFU
SERVING_RUN = DATA / "20261130-115401-synthetic-6ad2.json"  # steps and 240 requests
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "btune.json"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, parsed by prometheus_client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def one(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The only sample named ``name`` whose labels include ``labels``."""
    hits = [v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def scrape_feed(rec: dict[str, Any]) -> tuple[str, RunFeed]:
    """A RunFeed and the endpoint's histograms fed the run's timeline by hand, then scraped."""
    feed = RunFeed()
    collector = LiveCollector()
    histograms = collector.watch(feed, rec["id"], rec["config"]["workload"], rec["config"]["options"])
    for ev in replay.timeline(rec):
        feed(ev)
        histograms(ev)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode(), feed


def test_live_figures_are_the_records_own():
    rec = load_record(GPU_RUN)
    text, feed = scrape_feed(rec)
    got, s = samples(text), rec["summary"]
    assert len(feed.view().steps) == rec["summary"]["steps"]["total"]  # the window holds the whole run
    assert one(got, "btune_tokens_per_second") == pytest.approx(s["throughput_tokens_per_s"], rel=1e-12)
    assert one(got, "btune_step_seconds", quantile="0.5") == pytest.approx(s["step_ms"]["p50"] / 1000, rel=1e-12)
    assert one(got, "btune_step_seconds_count") == s["step_ms"]["n"]
    assert s["mfu"]["bf16"]["value"] is None  # a CPU run's steps (its GPUs sampled beside it): no peak, no MFU
    assert not [name for name, _ in got if name.startswith("btune_mfu")]
    assert one(got, "btune_flops_per_second") == pytest.approx(s["tflops"] * 1e12, rel=1e-12)
    assert one(got, "btune_energy_joules_total") == pytest.approx(s["energy_j"], rel=1e-12)
    from tuner.tui.widgets.power import joules_per_token  # the live power panel's figure

    assert one(got, "btune_energy_per_token_joules") == pytest.approx(joules_per_token(feed.view()), rel=1e-12)
    assert one(got, "btune_tokens_total") == s["tokens_total"]
    assert one(got, "btune_steps_total") == s["steps"]["total"]
    last = {}
    for ev in replay.timeline(rec):
        if ev.get("type") == "gpu":
            last[ev["gpu"]] = ev
    for gpu, ev in last.items():  # dcgm-exporter's names, in its units: the latest sample
        assert one(got, "DCGM_FI_DEV_POWER_USAGE", gpu=str(gpu)) == ev["power_w"]
        assert one(got, "DCGM_FI_DEV_FB_USED", gpu=str(gpu)) == ev["mem_used_mb"]
        assert one(got, "DCGM_FI_DEV_GPU_UTIL", gpu=str(gpu)) == ev["util_gpu"]
    labels = {k for (_, ls) in got for k, _ in ls}
    assert labels <= {"run", "workload", "gpu", "UUID", "quantile", "le", "preset", "batch_size", "seq_len",
                      "precision", "device", "compile", "tp", "model"}, labels
    assert one(got, "btune_run_info", run=rec["id"], workload="dense") == 1


def test_live_serving_figures_and_histograms():
    rec = load_record(SERVING_RUN)
    text, feed = scrape_feed(rec)
    got, serving = samples(text), rec["summary"]["serving"]
    # rates: over the requests' span, as the live serving panel computes them (the record's load duration comes
    # with the workload's closing summary); the latency statistics are the record's own
    from tuner.tui.widgets.latency import live_block

    panel = live_block(feed.view())
    assert panel is not None
    assert one(got, "btune_goodput_requests_per_second") == pytest.approx(panel["goodput"], rel=1e-12)
    assert one(got, "btune_requests_per_second") == pytest.approx(panel["request_throughput"], rel=1e-12)
    assert one(got, "btune_ttft_seconds", quantile="0.99") == pytest.approx(serving["ttft_ms"]["p99"] / 1000,
                                                                          rel=1e-12)
    assert one(got, "btune_e2e_seconds", quantile="0.5") == pytest.approx(serving["e2e_ms"]["p50"] / 1000, rel=1e-12)
    finished = serving["requests"]["finished"]
    assert one(got, "btune_request_ttft_seconds_count") == finished
    assert one(got, "btune_request_ttft_seconds_bucket", le="+Inf") == finished
    assert one(got, "btune_request_e2e_seconds_sum") == pytest.approx(serving["e2e_ms"]["mean"] * finished / 1000)
    assert one(got, "btune_request_itl_seconds_count") == serving["itl_ms"]["n"]
    assert live_summary(feed.view())["serving"]["ttft_ms"] == serving["ttft_ms"]


def test_export_uses_the_live_names_and_base_units():
    rec = load_record(GPU_RUN)
    text = export([rec], "prometheus").decode()
    got = samples(text)
    run = rec["id"]
    assert "# TYPE btune_step_seconds summary" in text and "unitless" not in text and "opt_" not in text
    assert one(got, "btune_step_seconds", quantile="0.5", run=run, workload="dense", status="ok") == \
        pytest.approx(rec["summary"]["step_ms"]["p50"] / 1000, rel=1e-12)
    assert one(got, "btune_tokens_per_second", run=run) == rec["summary"]["throughput_tokens_per_s"]
    assert one(got, "btune_energy_joules_total", run=run) == rec["summary"]["energy_j"]
    assert one(got, "btune_run_info", run=run, status="ok", preset=rec["config"]["options"]["preset"]) == 1
    assert one(got, "btune_gpu_memory_used_max_bytes", gpu="0") == \
        rec["summary"]["gpu"]["0"]["mem_used_mb_max"] * 2 ** 20
    for (name, labels), _ in got.items():
        keys = {k for k, _ in labels}
        if name != "btune_run_info":
            assert keys <= {"run", "workload", "status", "quantile", "gpu", "phase"}, (name, keys)
        assert re.fullmatch(r"(btune|DCGM_FI_DEV)_[A-Za-z0-9_]+", name), name
        assert not re.search(r"_(ms|mb|mib|tb_s|j)(_|$)", name), name  # base units only


def test_a_used_port_or_bad_host_is_one_line_and_exit_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = refused(capsys, ["run", "--metrics-port", str(port), "dense", "--preset", "tiny", "--device", "cpu"])
        assert line == f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}: Address already in use"
        from tuner.tui.main import main as tui_main

        assert tui_main(["--metrics-port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Address already in use" in err
    line = refused(capsys, ["run", "--metrics-port", str(free_port()), "--metrics-host", "no-such-host.invalid",
                            "dense", "--preset", "tiny", "--device", "cpu"])
    assert line.startswith("error: --metrics-port ") and "no-such-host.invalid" in line
    assert "a port is 1..65535" in refused(capsys, ["run", "--metrics-port", "70000", "dense"])


@pytest.mark.slow
def test_prometheus_client_is_imported_only_by_the_endpoint():
    code = "import sys, tuner.cli, tuner.console, tuner.export, tuner.prom; print('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# -- a real Prometheus ---------------------------------------------------------------------------------------------
#: Dashboard queries that need a GPU (NVML samples, a peak for MFU/MBU, the energy counter): on a CPU machine they
#: parse and return no data.
GPU_ONLY = ("DCGM_FI_DEV_", "btune_mfu_", "btune_mbu_", "btune_engine_mbu_", "btune_energy_",
            "btune_torch_memory_peak_bytes")


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy


def query(base: str, promql: str, at: float | None = None) -> dict[str, Any]:
    """Prometheus's answer to an instant query (``at``: its evaluation time)."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    try:
        with LOCAL.open(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # a query that does not parse: 400 with a JSON body
        return json.loads(exc.read())


def answers(base: str) -> bool:
    """Prometheus is up and its storage ready (while it starts it answers 503 "Service Unavailable" as text)."""
    try:
        with LOCAL.open(f"{base}/-/ready", timeout=10) as r:
            return r.status == 200 and query(base, "1")["status"] == "success"
    except OSError:  # refused, or an HTTPError (503) before the storage is ready
        return False


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    out = [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return out + [t["expr"] for p in dash["panels"] for t in p["targets"]]


@pytest.mark.slow
def test_a_real_prometheus_scrapes_a_run_and_answers_the_dashboard(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus; .ci/run installs it)")
    dense_port, serve_port, prom_port = free_port(), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: btune\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{dense_port}', '127.0.0.1:{serve_port}']\n")
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    out = tmp_path / "runs"
    try:
        wait_until(lambda: answers(base), 30, "prometheus to answer")
        dense = start_btune("run", "--out", str(out), "--metrics-port", str(dense_port), "dense", "--preset",
                            "tiny", "--device", "cpu", "--duration", "8")
        serve = start_btune("run", "--out", str(out), "--metrics-port", str(serve_port), "serve", "--preset",
                            "tiny", "--device", "cpu", "--duration", "8")
        for proc in (dense, serve):
            proc.communicate(timeout=120)
            assert proc.returncode == 0
        end = time.time()
        recs = {r["config"]["workload"]: r for r in map(load_record, out.glob("*.json"))}
        rec = recs["dense"]
        # The endpoint died with the run: ask for what Prometheus stored while it ran (within the last minute).
        live = query(base, f'last_over_time(btune_tokens_per_second{{run="{rec["id"]}"}}[1m])', end)
        seen = query(base, f'last_over_time(btune_steps_total{{run="{rec["id"]}"}}[1m])', end)
        assert live["status"] == "success" and live["data"]["result"] and seen["data"]["result"], (live, seen)
        (at, value), (at_seen, n) = live["data"]["result"][0]["value"], seen["data"]["result"][0]["value"]
        assert at == at_seen  # one scrape's samples
        # The exact comparison: the last stored tokens/s is the record's computation (steady tokens over steady
        # time) over the steps the feed held at that scrape: the last 240 of the first n steps, steady ones only.
        steps = merged_steps(rec["series"]["step"])
        n = int(float(n))
        assert 0 < n <= len(steps) and len(steps) == rec["summary"]["steps"]["total"]
        window = [r for r in steps[:n][-RunFeed()._history:] if is_steady(r)]
        expected = sum(r["tokens"] for r in window) / (sum(r["step_ms"] for r in window) / 1000.0)
        assert float(value) == pytest.approx(expected, rel=1e-9)
        # and, the run's whole steady time against that window, the same order as the record's figure
        final = rec["summary"]["throughput_tokens_per_s"]
        assert final / 2 < float(value) < final * 2, (value, final)
        served = query(base, f'max_over_time(btune_request_ttft_seconds_count{{run="{recs["serve"]["id"]}"}}[1m])',
                       end)
        assert served["data"]["result"], served

        empty = []
        for expr in dashboard_queries():
            if expr.startswith("label_values("):  # a template variable's query: Grafana asks the series API
                inner = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)
                assert inner is not None, expr
                expr = f"count by ({inner.group(2)}) ({inner.group(1)})"
            promql = (expr.replace("$run", ".*").replace("$gpu", ".*").replace("$__rate_interval", "1m")
                      .replace("$__range", "1m"))
            got = query(base, f"max_over_time(({promql})[1m:1s])", end)
            assert got["status"] == "success", (expr, got)
            if not got["data"]["result"]:
                empty.append(expr)
        needs_gpu = [e for e in empty if any(name in e for name in GPU_ONLY)]
        print("dashboard queries without data (GPU-only):", *needs_gpu, sep="\n  ")
        assert empty == needs_gpu, f"dashboard queries without data on a CPU run: {set(empty) - set(needs_gpu)}"
    finally:
        prom.terminate()
        prom.wait(timeout=30)


@pytest.mark.slow
def test_btune_help_is_unchanged_by_the_endpoint():
    res = btune("run", "--help")
    assert "--metrics-port PORT" in res.stdout and "--metrics-host HOST" in res.stdout


@pytest.mark.slow
def test_btune_tui_serves_the_run_it_watches(tmp_path):
    from test_tui_support import make_app, run, until

    from tests.test_tui import TINY, _launch
    from tuner.prom import serve_metrics

    server = serve_metrics(free_port())

    async def body() -> tuple[str, str]:
        app = make_app(tmp_path)
        app.metrics = server
        async with app.run_test(size=(100, 30)) as pilot:
            live = await _launch(pilot, TINY)
            await until(pilot, lambda: not live.is_live, 90, "the end of the run")
            assert live.runner is not None
            with LOCAL.open(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
                return live.runner.run_id, r.read().decode()

    try:
        run_id, text = run(body())
    finally:
        server.close()
    got = samples(text)
    assert one(got, "btune_steps_total", run=run_id, workload="dense") == 3  # TINY: 1 warm-up + 2 steps
    assert one(got, "btune_tokens_per_second", run=run_id) > 0


def test_a_scrape_within_a_second_of_the_last_reuses_its_figures(monkeypatch):
    from tuner import prom

    rec = load_record(GPU_RUN)
    events = [e for e in replay.timeline(rec) if e["type"] != "summary"]
    steps = [i for i, e in enumerate(events) if e["type"] == "step"]
    feed, collector = RunFeed(), LiveCollector()
    collector.watch(feed, rec["id"], "dense")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def steps_total() -> float:
        return one(samples(generate_latest(registry).decode()), "btune_steps_total", run=rec["id"])

    half = steps[len(steps) // 2]
    for ev in events[:half]:
        feed(ev)
    first = steps_total()
    for ev in events[half:]:
        feed(ev)
    assert steps_total() == first  # the feed changed, but the last computation is under REUSE_S old
    monkeypatch.setattr(prom, "REUSE_S", 0.0)
    assert steps_total() == len(steps) > first
