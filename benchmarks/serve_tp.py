"""A tensor-parallel serving replica against one GPU: the same closed-loop load (a batch of equal requests, as
in benchmarks/serve.py) on one replica at --tp 1 and at --tp N, side by side in one script run.

Reports the median pure-decode step, TPOT and output tokens/s, and the decode speed-up (TP=1 step / TP=N step;
N is the ideal for a memory-bound step, less the all-reduces: two per layer plus the greedy pick).

usage: python benchmarks/serve_tp.py [--tp 2] [--layers 32] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile

import torch
from serve import Bench, btune_run, failed, lengths_args, serving  # benchmarks/serve.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--preset", default=Bench.preset)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test, no figures")
    args = ap.parse_args()
    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if args.device == "cuda" else "cpu"
    print(f"{gpus}, torch {torch.__version__}, {datetime.date.today()}, {args.preset} x {args.layers} layers, "
          f"prompt {args.prompt} / output {args.output} tokens\n")
    print("| batch | TP | status | decode step p50 ms | TPOT p50 ms | output tok/s | decode speed-up vs TP=1 |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as out:
        bench = Bench(args.preset, args.layers, args.prompt, args.output, args.device, out)
        for batch in (int(b) for b in args.batches.split(",")):
            base = None
            for tp in (1, args.tp):
                rec = btune_run(bench, [*lengths_args(batch, args.prompt, args.output, 2), "--tp", str(tp),
                                        "--compile-mode", bench.graphs])
                why = failed(rec)
                if why:
                    print(f"| {batch} | {tp} | {why} | | | | |", flush=True)
                    continue
                step = rec["summary"]["engine"]["decode_step_ms"]["p50"]
                base = step if tp == 1 else base
                s = serving(rec)
                up = f"{base / step:.2f}x" if base and tp > 1 else "-"
                print(f"| {batch} | {tp} | ok | {step:.3f} | {s['tpot_ms']['p50']:.3f} | "
                      f"{s['output_tokens_per_s']:,.1f} | {up} |", flush=True)


if __name__ == "__main__":
    main()
