"""Does attaching the console slow the workload? Steady tokens/s alone versus under `btune run`.

Alternates the two, ``--pairs`` times: the workload alone (``python -m workloads.dense``, events as
JSON lines on stdout) and the same argv under ``python -m tuner run`` (runner, socket, NVML and psutil
sampling at 10 Hz, journal, record). Both are summarised by the same code (tuner.summary).
usage: python benchmarks/console_overhead.py [--pairs 5] [workload options...]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuner.protocol import Decoder
from tuner.record import RecordBuilder
from tuner.runs import load_record

DEFAULT = ["--preset", "llama-3.1-8b", "--layers", "2", "--batch-size", "2", "--seq-len", "4096",
           "--steps", "30", "--warmup", "5"]


def alone(opts: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "workloads.dense", *opts], capture_output=True, check=True).stdout
    dec = Decoder()
    t = time.time()
    b = RecordBuilder("alone", t, {}, {})
    for ev, _ in dec.feed(out):
        b.add(ev)
    return b.finish("ok", 0)["summary"]


def attached(opts: list[str], out_dir: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "dense", *opts, "--out", out_dir, "--sample-hz", "10"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return load_record(Path(res.stdout.strip().splitlines()[-1]))["summary"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    args, opts = ap.parse_known_args()
    opts = opts or DEFAULT
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {name}, torch {torch.__version__}, {datetime.date.today()}, workload dense {' '.join(opts)}")
    a_tps, b_tps = [], []
    last = None
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.pairs):
            for kind in (("alone", "attached") if i % 2 == 0 else ("attached", "alone")):
                s = alone(opts) if kind == "alone" else attached(opts, d)
                tps = s["throughput_tokens_per_s"]
                (a_tps if kind == "alone" else b_tps).append(tps)
                print(f"pair {i} {kind:<9} {tps:12,.0f} tok/s  step p50 {s['step_ms']['p50']:8.2f} ms  "
                      f"MFU {s['mfu']['bf16']['value'] or 0:.3f}", flush=True)
                if kind == "attached":
                    last = s
    ma, mb = statistics.median(a_tps), statistics.median(b_tps)
    print()
    print("| | median tokens/s | runs |")
    print("|---|---:|---:|")
    print(f"| workload alone | {ma:,.0f} | {len(a_tps)} |")
    print(f"| under btune run (10 Hz sampling) | {mb:,.0f} | {len(b_tps)} |")
    print(f"| attached / alone | {mb / ma:.4f} | |")
    if last:
        gpu0 = (last.get("gpu") or {}).get("0", {})
        print(f"last attached run: energy {last.get('energy_j')} J, J/token {last.get('joules_per_token')}, "
              f"power mean {gpu0.get('power_w', {}).get('mean')} W, integrated {gpu0.get('energy_integrated_j')} J, "
              f"notes {last.get('notes')}")


if __name__ == "__main__":
    main()
