"""Bring your own workload, on one GPU (issue 18): a user's training script (examples/train_llama.py, a small
Llama from transformers, plain PyTorch loop, reporting through ``import btune``) run alone and under
``btune run --``, checked against what the script and NVML say themselves.

1. Throughput alone vs under btune: the script's own steady tokens/s (CUDA-synchronised wall time over the same
   steps), runs alternated (alone, btune, alone, btune, ...) so drift hits both sides.
2. MFU: the record's (btune's timing of the API's steps, the meta's FLOPs per token, btune's peak table) beside
   the script's own (its timing, the same FLOPs per token, the datasheet peak it names).
3. Energy: the record's (its NVML counter readings of the GPU the run could see) beside this script's own
   counter series of that GPU, read every 20 ms in a thread, interpolated at the record's first and last
   readings; the power integral beside both.
4. Memory profile (``--memory-profile 3``): the snapshot's peak of live allocations (trace replay) beside
   ``torch.cuda.max_memory_allocated`` over the same steps.
5. The API's cost per call (benchmarks/api_overhead.py), on this machine's CPU.

usage: python benchmarks/byo_workload.py [--pairs 3] [--steps 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from energy_mbu import CounterReader  # noqa: E402

from tuner.runs import load_record  # noqa: E402

SCRIPT = ROOT / "examples" / "train_llama.py"


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("BTUNE_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return out


def alone(shape: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), *shape, "--out", str(out)], check=True, env=env(),
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def under_btune(shape: list[str], out: Path, runs: Path, *flags: str) -> tuple[dict, dict]:
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "--out", str(runs), *flags, "--",
                          sys.executable, str(SCRIPT), *shape, "--out", str(out)],
                         env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"btune run failed ({res.returncode}): {res.stderr[-2000:]}{res.stdout[-2000:]}")
    return json.loads(out.read_text()), load_record(Path(res.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="btune-byo-"))
    runs = work / "runs"
    shape = ["--steps", str(args.steps), "--warmup", "10", "--batch", "8", "--seq", "2048", "--hidden", "2048",
             "--layers", "8"]

    # 1 and 2: alternated pairs
    solo, wrapped, records = [], [], []
    for i in range(args.pairs):
        solo.append(alone(shape, work / f"alone{i}.json"))
        own, rec = under_btune(shape, work / f"btune{i}.json", runs)
        wrapped.append(own)
        records.append(rec)
    a = statistics.median(r["tokens_per_s"] for r in solo)
    b = statistics.median(r["tokens_per_s"] for r in wrapped)
    print("| run | tokens/s (script's own) |")
    print("|---|---|")
    for i in range(args.pairs):
        print(f"| pair {i}: alone / under btune | {solo[i]['tokens_per_s']:,.0f} / {wrapped[i]['tokens_per_s']:,.0f} |")
    print(f"| median: alone / under btune | {a:,.0f} / {b:,.0f} ({(b / a - 1) * 100:+.2f}%) |")
    print()
    print("| pair | record MFU (btune) | script's own MFU | record tok/s | script's tok/s |")
    print("|---|---|---|---|---|")
    for i, (own, rec) in enumerate(zip(wrapped, records, strict=True)):
        mfu = rec["summary"]["mfu"]["bf16"]
        print(f"| {i} | {mfu.get('value')} | {own['mfu']} | {rec['summary']['throughput_tokens_per_s']:,.0f} | "
              f"{own['tokens_per_s']:,.0f} |")
    print()

    # 3: energy against this script's own counter readings, on a run with an eval phase
    with CounterReader(0) as reader:
        own, rec = under_btune([*shape, "--eval-every", "20"], work / "energy.json", runs)
    s = rec["summary"]
    e = rec["series"]["energy"][str(s["energy_gpus"][0])]
    mine = reader.at(e["t"][-1]) - reader.at(e["t"][0])
    print(f"energy: record {s['energy_j']:,.1f} J (GPU {s['energy_gpus']}), this script's counter "
          f"{mine:,.1f} J ({(s['energy_j'] / mine - 1) * 100:+.3f}%), power integral "
          f"{s['energy_integrated_j']:,.1f} J; reader UUID {reader.uuid}")
    parts = [p["energy_j"] for p in s["phases"]]
    total = sum(parts) if all(v is not None for v in parts) else None
    print(f"phases add up to {total} J of the record's {s['energy_j']} J")
    print("| phase | duration s | energy J | power integral J | mean W | tokens | J/token |")
    print("|---|---|---|---|---|---|---|")
    for p in s["phases"]:
        print(f"| {p['phase']} | {p['duration_s']:.3f} | {p['energy_j']} | {p['energy_integrated_j']} | "
              f"{p['power_w']} | {p['tokens']} | {p['joules_per_token']} |")
    print()

    # 4: memory profile
    own, rec = under_btune(shape, work / "memory.json", runs, "--memory-profile", "3")
    mp = rec["summary"].get("memory_profile") or {}
    print(f"memory profile: snapshot peak {mp.get('peak_bytes')} B, max_memory_allocated (window) "
          f"{mp.get('max_memory_allocated')} B, script's own max_memory_allocated (its window) "
          f"{own.get('max_memory_allocated')} B; snapshot {mp.get('snapshot')}")
    for site in (mp.get("top_sites") or [])[:5]:
        print(f"  {site.get('bytes'):>14,} B  {site.get('blocks')} blocks  {site.get('site')}")
    print()

    # 5: the API's cost per call
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "api_overhead.py"), "--calls", "200000"], check=True,
                   env=env())
    print(f"work dir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
