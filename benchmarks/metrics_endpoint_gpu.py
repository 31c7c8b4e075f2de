"""The live metrics endpoint on a GPU run (issue 21): throughput with and without ``--metrics-port``, and every
query of docs/grafana/btune.json answered by a real Prometheus from GPU runs.

1. A/B: ``btune run dense`` (llama-3.1-8b shapes, 4 layers, train) alternated without and with
   ``--metrics-port``, ``--pairs`` times (off, on, on, off, ...: drift hits both arms); a Prometheus scrapes the
   endpoint every second (15 times its default rate). The steady tokens/s of each record; the difference of the
   arms' means in percent, and each pair's ratio.
2. The dashboard: a short dense decode run (MBU), an FP8 run (torchao) and a serving run are also scraped; then
   every query of the Grafana dashboard (template variables as Grafana fills them) is asked of that Prometheus over
   the runs' window; each must parse, and the table says which return data.

usage: python benchmarks/metrics_endpoint_gpu.py --prometheus PATH [--pairs 3] [--duration 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.runs import load_record  # noqa: E402

DASHBOARD = ROOT / "docs" / "grafana" / "btune.json"
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, promql: str, at: float) -> dict:
    params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    try:
        with LOCAL.open(f"{base}/api/v1/query?{params}", timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # a query that does not parse: 400 with a JSON body
        return json.loads(exc.read())


def ready(base: str) -> bool:
    try:
        with LOCAL.open(f"{base}/-/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def run(out: Path, args: list[str], port: int | None) -> dict:
    """One ``btune run``; its record."""
    metrics = ["--metrics-port", str(port)] if port else []
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "--out", str(out), *metrics, *args],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        sys.exit(f"btune run {' '.join(args)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return load_record(res.stdout.strip().splitlines()[-1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, template variables filled as Grafana does
    (``label_values(m, l)``, a variable's query, is asked as ``count by (l) (m)``)."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"variable {v['name']}", v["query"]["query"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    out += [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    filled = []
    for title, expr in out:
        m = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)
        if m:
            expr = f"count by ({m.group(2)}) ({m.group(1)})"
        filled.append((title, expr.replace("$run", ".*").replace("$gpu", ".*").replace("$__rate_interval", "1m")
                       .replace("$__range", "5m")))
    return filled


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True, help="the prometheus binary")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--preset", default="llama-3.1-8b", help="the dense runs' preset (tiny with --device cpu: a "
                    "smoke test of this script)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="btune-metrics-gpu-"))
    work = Path(tempfile.mkdtemp(prefix="btune-prom-"))
    port, prom_port = free_port(), free_port()
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: btune\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    prom = subprocess.Popen([args.prometheus, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.time() + 60
        while not ready(base):
            if time.time() > deadline or prom.poll() is not None:
                sys.exit("prometheus did not start")
            time.sleep(0.5)
        shape = ["--preset", args.preset, "--device", args.device]
        shape += ["--layers", "4"] if "llama" in args.preset else []
        dense = ["dense", *shape, "--warmup", "5", "--duration", str(args.duration)]
        arms: dict[str, list[float]] = {"off": [], "on": []}
        scraped: list[float] = []
        for i in range(args.pairs):
            for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                rec = run(out, dense, port if arm == "on" else None)
                tps = rec["summary"]["throughput_tokens_per_s"]
                arms[arm].append(tps)
                if arm == "on":
                    got = query(base, f'count_over_time(btune_tokens_per_second{{run="{rec["id"]}"}}[10m])',
                                time.time())
                    scraped.append(float(got["data"]["result"][0]["value"][1]) if got["data"]["result"] else 0.0)
                print(f"pair {i + 1} {arm:>3}: {tps:,.0f} tokens/s  mfu {rec['summary'].get('mfu_pct')}", flush=True)
        # the dashboard's GPU-only panels: a decode run (MBU) and a serving run, scraped too
        start = time.time()
        run(out, ["dense", *shape, "--mode", "decode", "--batch-size", "8", "--seq-len", "2048", "--duration", "10"],
            port)
        if args.device == "cuda":  # btune_mfu_fp8_ratio: an FP8 run (torchao)
            run(out, [*dense[:-2], "--duration", "10", "--fp8-mode", "torchao"], port)
        run(out, ["serve", "--preset", "tiny", "--device", args.device, "--duration", "15"], port)
        time.sleep(3)
        end = time.time()
        rows = []
        for title, promql in dashboard_queries():
            window = f"{int(end - start) + 120}s"
            got = query(base, f"max_over_time(({promql})[{window}:1s])", end)
            rows.append((title, promql, got["status"], len(got.get("data", {}).get("result", []))))
    finally:
        prom.terminate()
        prom.wait(timeout=30)

    off, on = statistics.mean(arms["off"]), statistics.mean(arms["on"])
    print("\n| arm | runs | tokens/s mean | stdev | per run |")
    print("|---|---:|---:|---:|---|")
    for arm in ("off", "on"):
        v = arms[arm]
        print(f"| {'without' if arm == 'off' else 'with'} --metrics-port | {len(v)} | {statistics.mean(v):,.0f} | "
              f"{statistics.stdev(v) if len(v) > 1 else 0:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")
    ratios = [b / a for a, b in zip(arms["off"], arms["on"], strict=True)]
    print(f"\nwith / without: {on / off - 1:+.3%} (pairs: {', '.join(f'{r - 1:+.3%}' for r in ratios)}); "
          f"samples Prometheus stored per 'on' run: {', '.join(f'{s:.0f}' for s in scraped)}")
    print("\n| dashboard panel | query | status | series with data |")
    print("|---|---|---|---:|")
    for title, promql, status, n in rows:
        print(f"| {title} | `{promql}` | {status} | {n} |")
    empty = [r for r in rows if r[3] == 0 or r[2] != "success"]
    print(f"\n{len(rows) - len(empty)} of {len(rows)} dashboard queries returned data"
          + (f"; without: {', '.join(r[0] for r in empty)}" if empty else ""))
    return 0 if not empty and abs(on / off - 1) < 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
