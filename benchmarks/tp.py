"""Tensor parallelism on several GPUs: tp-validate in bf16, and dense train throughput at TP=1 and TP=N.

usage: python benchmarks/tp.py [--tp 2] [--layers 8]   (prints markdown tables; every figure is a btune record)
"""

from __future__ import annotations

import argparse
import datetime
import tempfile

from tuner.launch import run_record


def run(args: list[str], out: str) -> dict:
    """``args`` = WORKLOAD OPTIONS..., run through the console core (tuner.launch.run_record)."""
    return run_record(args[0], args[1:], out)


def moe(tps: list[int], out: str) -> None:
    """MoE with TP inside the routed experts: validation in bf16 and train throughput against TP=1."""
    print("| tp-validate --model moe (moe-64e-top6 x 2 layers, 1 MoE) | dtype | tensors | worst rel err | result |")
    print("|---|---|---:|---:|---|")
    for tp in tps:
        rec = run(["tp-validate", "--model", "moe", "--preset", "moe-64e-top6", "--layers", "2", "--tp", str(tp),
                   "--seq-len", "1024", "--batch-size", "1", "--dtype", "bf16"], out)
        w = rec["summary"].get("workload") or {}
        worst = max((t.get("max_rel") or 0 for t in w.get("tensors") or []), default=None)
        print(f"| TP={tp} | bf16 | {len(w.get('tensors') or [])} | {worst if worst is None else f'{worst:.2e}'} | "
              f"{'PASS' if w.get('passed') else 'FAIL ' + str(w.get('mismatches'))[:200]} ({rec['status']}) |",
              flush=True)
    print("\n| moe train, moe-64e-top6 x 2 layers (1 MoE), seq 4096, grouped experts | TP | tokens/s | step p50 ms | "
          "scaling efficiency |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for tp in [1, *tps]:
        rec = run(["moe", "--preset", "moe-64e-top6", "--layers", "2", "--seq-len", "4096", "--batch-size", "1",
                   "--steps", "15", "--warmup", "5", "--tp", str(tp)], out)
        s = rec["summary"]
        if rec["status"] != "ok":
            print(f"| | {tp} | {rec['status']}: {(rec.get('error') or {}).get('message', '')[:200]} | | |", flush=True)
            continue
        tps_ = s["throughput_tokens_per_s"]
        base = base or tps_
        print(f"| | {tp} | {tps_:,.0f} | {s['step_ms']['p50']:.1f} | {tps_ / (tp * base) * 100:.0f}% |", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--part", default="all", choices=("all", "dense", "moe"))
    args = ap.parse_args()
    import torch

    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}\n")
    with tempfile.TemporaryDirectory() as out:
        if args.part in ("all", "moe"):
            moe(args.tp, out)
        if args.part == "moe":
            return
        print("| tp-validate | dtype | tensors | worst rel err | tolerance | result |")
        print("|---|---|---:|---:|---:|---|")
        for tp in args.tp:
            for mode in ("train",):
                rec = run(["tp-validate", "--preset", "llama-3.1-8b", "--layers", "2", "--tp", str(tp), "--mode", mode,
                           "--seq-len", "1024", "--batch-size", "2", "--dtype", "bf16"], out)
                w = rec["summary"].get("workload") or {}
                worst = max((t.get("max_rel") or 0 for t in w.get("tensors") or []), default=None)
                print(f"| TP={tp} {mode} llama-3.1-8b x2 layers | bf16 | {len(w.get('tensors') or [])} | "
                      f"{worst if worst is None else f'{worst:.2e}'} | {w.get('tolerance')} | "
                      f"{'PASS' if w.get('passed') else 'FAIL ' + str(w.get('mismatches'))[:200]} ({rec['status']}) |",
                      flush=True)
        print("\n| dense train, llama-3.1-8b shapes | TP | tokens/s | step p50 ms | MFU (of TP x peak) | "
              "scaling efficiency |")
        print("|---|---:|---:|---:|---:|---:|")
        base = None
        for tp in [1, *args.tp]:
            rec = run(["dense", "--preset", "llama-3.1-8b", "--layers", str(args.layers), "--seq-len", "8192",
                       "--batch-size", "1", "--steps", "15", "--warmup", "5", "--tp", str(tp),
                       "--compile-mode", "default"], out)
            s = rec["summary"]
            if rec["status"] != "ok":
                print(f"| {args.layers} layers seq 8192 | {tp} | {rec['status']}: "
                      f"{(rec.get('error') or {}).get('message', '')[:200]} | | | |", flush=True)
                continue
            tps = s["throughput_tokens_per_s"]
            base = base or tps
            eff = tps / (tp * base)
            print(f"| {args.layers} layers seq 8192 | {tp} | {tps:,.0f} | {s['step_ms']['p50']:.1f} | "
                  f"{(s['mfu']['bf16']['value'] or 0) * 100:.1f}% | {eff * 100:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
