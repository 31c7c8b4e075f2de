"""The HTTP path's cost on one GPU (issue 20): btune's engine in process vs the same engine behind ``btune
serve-api``, driven by the same seeded load through ``btune run serve --endpoint``.

1. In process: ``btune run serve`` closed loop (``--concurrency`` = ``--max-batch``), which also measures the
   capacity, then open loop at half that capacity (Poisson), then one client sending one request at a time (the
   HTTP path's own latency, no queueing).
2. ``btune serve-api`` with the same model and engine knobs on 127.0.0.1, and the same two loads through
   ``--endpoint`` (completions API, streamed; the word code of random weights makes a synthetic prompt of n
   words exactly n tokens, so the prompts are as long as the in-process ones).
3. ``--find-max-rate`` against the server, from a quarter of the capacity.

Every figure is a ``btune run serve`` record; the table puts the two paths side by side.

usage: python benchmarks/endpoint_gpu.py [--layers 32] [--max-batch 16] [--compile-mode reduce-overhead]
       [--num-requests 128] [--probe-requests 64] [--max-rate-steps 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.runs import load_record  # noqa: E402

T0 = time.monotonic()


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("BTUNE_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return out


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def btune_run(runs: Path, *args: str) -> dict:
    """``btune run serve ARGS``; its record, or {"refused": last line}."""
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "serve", "--out", str(runs), *args], env=env(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines() or ["?"]
        return {"refused": tail[-1][:300]}
    return load_record(Path(res.stdout.strip().splitlines()[-1]))


def start_server(engine: list[str]) -> tuple[subprocess.Popen, str]:
    """``btune serve-api`` on a free port; the process and its base URL once it prints its ready line."""
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "serve-api", "--port", "0", *engine], env=env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
    raise SystemExit(f"serve-api ended ({proc.wait()}) before listening")


def row(name: str, rec: dict) -> str:
    if "refused" in rec:
        return f"| {name} | failed: {rec['refused']} |" + " |" * 9
    sv = rec["summary"]["serving"]
    q = sv["requests"]
    fails = sv.get("failures", {}).get("total", 0)
    return (f"| {name} | {q['finished']}/{q['total']} ({fails} failed) | {sv['request_throughput']:.2f} | "
            f"{sv['output_tokens_per_s']:,.0f} | {sv['ttft_ms']['p50']:.1f} / {sv['ttft_ms']['p99']:.1f} | "
            f"{sv['tpot_ms']['p50']:.2f} / {sv['tpot_ms']['p99']:.2f} | {sv['itl_ms']['p50']:.2f} / "
            f"{sv['itl_ms']['p99']:.2f} | {sv['e2e_ms']['p50']:,.0f} | {100 * q['good'] / q['total']:.0f}% | "
            f"{sv['peak_concurrency']} |")


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


HEADER = ("| path, load | finished | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | "
          "E2E p50 ms | good | peak conc. |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--single-requests", type=int, default=24, help="one client, one request at a time (0: skip)")
    ap.add_argument("--probe-requests", type=int, default=64)
    ap.add_argument("--max-rate-steps", type=int, default=6)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--prompt-len", default="uniform:128,1024")
    ap.add_argument("--output-len", default="uniform:32,256")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--capacity", type=float, default=0.0, help="skip the in-process loads: this capacity (req/s)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="btune-endpoint-"))
    runs = work / "runs"
    dtype = "bf16" if args.device == "cuda" else "fp32"
    engine = ["--preset", args.preset, "--layers", str(args.layers), "--device", args.device, "--dtype", dtype,
              "--max-batch", str(args.max_batch), "--compile-mode", args.compile_mode]
    load = ["--preset", args.preset, "--prompt-len", args.prompt_len, "--output-len", args.output_len,
            "--num-requests", str(args.num_requests), "--seed", "0"]
    closed = ["--concurrency", str(args.max_batch)]
    rows: list[tuple[str, dict]] = []
    records: dict[str, str] = {}

    def keep(name: str, rec: dict) -> dict:
        rows.append((name, rec))
        records[name] = rec.get("run_id", "") if "refused" not in rec else rec["refused"]
        log(row(name, rec))
        return rec

    inproc_engine = engine[2:]  # the load names the preset
    capacity = args.capacity
    if not capacity:
        log("in process, closed loop (compiles)")
        cap = keep(f"in process, closed loop ({args.max_batch} clients)",
                   btune_run(runs, *inproc_engine, *load, *closed))
        if "refused" in cap:
            return 1
        capacity = cap["summary"]["serving"]["request_throughput"]
    rate = round(capacity / 2, 2)
    log(f"capacity {capacity:.2f} req/s; open loop at {rate}")
    single = ["--concurrency", "1", "--num-requests", str(args.single_requests)]  # the later --num-requests wins
    if not args.capacity:
        keep(f"in process, open loop {rate} req/s", btune_run(runs, *inproc_engine, *load, "--request-rate", str(rate)))
        if args.single_requests:
            keep("in process, one client", btune_run(runs, *inproc_engine, *load, *single))

    log("serve-api starting (compiles)")
    t = time.monotonic()
    proc, url = start_server(engine)
    log(f"serve-api ready in {time.monotonic() - t:.1f} s at {url}")
    client = ["--endpoint", url, "--model", args.preset]
    try:
        keep(f"HTTP (serve-api), closed loop ({args.max_batch} clients)", btune_run(runs, *client, *load, *closed))
        keep(f"HTTP (serve-api), open loop {rate} req/s", btune_run(runs, *client, *load, "--request-rate", str(rate)))
        if args.single_requests:
            keep("HTTP (serve-api), one client", btune_run(runs, *client, *load, *single))
        log("find-max-rate")
        search = btune_run(runs, *client, *load, "--num-requests", str(args.probe_requests), "--find-max-rate",
                           "--request-rate", str(round(capacity / 4, 2)),
                           "--max-rate-steps", str(args.max_rate_steps))
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"\n{args.preset} shape, {args.layers} layers, {dtype}, {args.max_batch} slots, compile {args.compile_mode}; "
          f"{args.num_requests} requests, prompts {args.prompt_len}, outputs {args.output_len}, seed 0\n")
    print(HEADER)
    for name, rec in rows:
        print(row(name, rec))
    print()
    if "refused" in search:
        print(f"find-max-rate: failed: {search['refused']}")
    else:
        curve = search["summary"]["serving"].get("curve", [])
        print(f"--find-max-rate ({args.probe_requests} requests a probe, SLO TTFT <= 2000 ms, TPOT <= 100 ms, "
              f"99% good): max rate {search['summary']['serving'].get('max_rate')}\n")
        print("| rate req/s | req/s done | output tok/s | good % | TTFT p50 / p99 ms | TPOT p50 / p99 ms | passed |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for p in curve:
            good = "-" if p["good_fraction"] is None else f"{100 * p['good_fraction']:.1f}%"
            print(f"| {p['rate']} | {p['request_throughput']:.2f} | {p['output_tokens_per_s']:,.0f} | {good} | "
                  f"{ms(p['ttft_ms']['p50'])} / {ms(p['ttft_ms']['p99'])} | {ms(p['tpot_ms']['p50'])} / "
                  f"{ms(p['tpot_ms']['p99'])} | {p['passed']} |")
    (work / "endpoint_gpu.json").write_text(json.dumps({"records": records}, indent=1))
    log(f"done; records under {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
