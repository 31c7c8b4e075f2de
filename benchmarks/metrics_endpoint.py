"""The live metrics endpoint's cost on the console (issue 21): CPU per scrape with 8 GPUs' samples.

A console process holds a RunFeed filled to its live window (240 steps, 120 samples per GPU for 8 GPUs, the
energy counters; for a serving run 2,000 requests and their latency histograms), built from a recorded run of
8 GPUs (tests/data/runs, fake NVML) whose events are repeated with later timestamps, and serves it with
``tuner.prom.serve_metrics`` on 127.0.0.1. Another process scrapes it N times back to back; this process's CPU
time over the scrapes (psutil: the endpoint's thread and everything it computes) divided by N is the cost of a
scrape. A scrape every 15 s (Prometheus's default) costs that over 15 s of one core.

usage: python benchmarks/metrics_endpoint.py [--scrapes 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner import replay  # noqa: E402
from tuner.feed import RunFeed  # noqa: E402
from tuner.prom import client_families, live_families, serve_metrics  # noqa: E402
from tuner.runs import load_record  # noqa: E402

RUNS = ROOT / "tests" / "data" / "runs"
CLIENT = """
import sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
lat, size = [], 0
for _ in range(n):
    t = time.perf_counter()
    size = len(urllib.request.urlopen(url).read())
    lat.append(time.perf_counter() - t)
lat.sort()
print(size, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3)
"""


def filled(record: dict, copies: int) -> tuple[RunFeed, list]:
    """A feed holding the record's timeline repeated ``copies`` times, each copy later than the last (steps
    renumbered), and the events fed."""
    events = list(replay.timeline(record))
    span = max(e["t"] for e in events) - min(e["t"] for e in events) + 1.0
    steps = sum(1 for e in events if e["type"] == "step")
    feed, fed = RunFeed(), []
    for k in range(copies):
        for e in events:
            if e["type"] == "summary" or (k and e["type"] == "meta"):
                continue
            ev = dict(e, t=e["t"] + k * span)
            if ev["type"] == "step":
                ev["step"] = ev["step"] + k * steps
            if ev["type"] == "request":
                ev["rid"] = ev["rid"] + k * 10_000
                for f in ("arrival_s", "first_token_s", "finish_s"):
                    if ev.get(f) is not None:
                        ev[f] += k * span
                ev["token_s"] = [x + k * span for x in ev.get("token_s") or []]
            feed(ev)
            fed.append(ev)
    return feed, fed


def measure(name: str, record: dict, copies: int, scrapes: int, cached: bool) -> str:
    feed, fed = filled(record, copies)
    server = serve_metrics(0, "127.0.0.1")
    if not cached:  # every scrape computes (as when the feed changed and the last computation is >= REUSE_S old)
        collector = server.collector
        server.collector.collect = lambda: client_families(live_families(collector._watched))  # type: ignore
    port = server.server.server_address[1]
    meta = next(e for e in fed if e["type"] == "meta")
    hist = server.collector.watch(feed, record["id"], meta.get("workload", "?"), meta.get("options"))
    for ev in fed:
        if ev["type"] == "request":
            hist(ev)
    view = feed.view()
    gpus = len({s.get("gpu") for s in fed if s["type"] == "gpu"})
    url = f"http://127.0.0.1:{port}/metrics"
    subprocess.run([sys.executable, "-c", CLIENT, url, "3"], check=True, capture_output=True)  # warm
    me = psutil.Process()
    before, t0 = me.cpu_times(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLIENT, url, str(scrapes)], check=True, capture_output=True,
                         text=True).stdout.split()
    wall = time.perf_counter() - t0
    after = me.cpu_times()
    server.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    size, p50, p99 = int(out[0]), float(out[1]), float(out[2])
    per = cpu / scrapes * 1e3
    return (f"| {name} | {gpus} | {len(view.steps)} | {len(view.requests)} | {size:,} | {per:.2f} | {p50:.2f} / "
            f"{p99:.2f} | {per / 15_000 * 100:.4f}% | {scrapes / wall:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    dense = load_record(next(RUNS.glob("*-dense-504a.json")))  # 8 fake-NVML GPUs
    serve = load_record(next(RUNS.glob("*-synthetic-6ad2.json")))  # 240 requests
    print(f"python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs, {args.scrapes} scrapes a row\n")
    print("| feed | GPUs | steps in window | requests in window | exposition bytes | console CPU ms / scrape | "
          "scrape p50 / p99 ms | one core at a 15 s interval | scrapes/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cached in (False, True):
        how = "reused (unchanged feed)" if cached else "computed"
        print(measure(f"dense, 8 GPUs, {how}", dense, 30, args.scrapes, cached))
        print(measure(f"serving, {how}", serve, 10, args.scrapes, cached))
    return 0


if __name__ == "__main__":
    sys.exit(main())
