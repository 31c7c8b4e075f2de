"""Serving on several GPUs: the same closed-loop load per replica on 1 GPU and on N GPUs (N replicas, rank 0
dispatching), counted once across ranks; scaling efficiency = N-replica throughput / (N x 1-replica).

usage: python benchmarks/serve_replicas.py [--replicas 4] [--layers 32] [--duration 30]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from typing import Any

import torch
from serve import Bench, btune_run, failed, serving  # benchmarks/serve.py


def run(replicas: int, args: argparse.Namespace, out: str) -> dict[str, Any]:
    bench = Bench(layers=args.layers, out=out)
    return btune_run(bench, ["--replicas", str(replicas), "--max-batch", str(args.max_batch),
                             "--concurrency", str(2 * args.max_batch * replicas), "--duration", str(args.duration),
                             "--drain-timeout", "0", "--prompt-len", "uniform:128,1024",
                             "--output-len", "uniform:32,256", "--compile-mode", "reduce-overhead"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    args = ap.parse_args()
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}, llama-3.1-8b x {args.layers} layers, {args.max_batch} slots per replica, "
          f"closed loop with 2 clients per slot, {args.duration:g} s, prompts uniform:128,1024, "
          f"outputs uniform:32,256\n")
    print("| GPUs (replicas) | status | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p99 ms "
          "| requests done / unfinished | per-replica requests | scaling efficiency |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as out:
        base = None
        for n in (1, args.replicas):
            rec = run(n, args, out)
            why = failed(rec)
            if why:
                print(f"| {n} | {why} | | | | | | | | |", flush=True)
                continue
            s = serving(rec)
            per = {}
            for e in rec["events"]:
                if e["type"] == "request" and e.get("finished"):
                    per[e["replica"]] = per.get(e["replica"], 0) + 1
            tps = s["output_tokens_per_s"]
            base = tps if n == 1 else base
            eff = f"{tps / (n * base) * 100:.0f}%" if base and n > 1 else "-"
            n_ = s["requests"]
            print(f"| {n} | ok | {s['request_throughput']:.2f} | {tps:,.0f} | {s['ttft_ms']['p50']:,.0f} / "
                  f"{s['ttft_ms']['p99']:,.0f} | {s['tpot_ms']['p50']:.1f} / {s['tpot_ms']['p99']:.1f} | "
                  f"{s['itl_ms']['p99']:.1f} | {n_['finished']} / {n_['unfinished']} | "
                  f"{', '.join(str(per[k]) for k in sorted(per))} | {eff} |", flush=True)


if __name__ == "__main__":
    main()
