"""Beyond one GPU (issue 23) on two GPUs: every mesh validated on NCCL, then FSDP2, context parallelism (btune's
gather and PyTorch's ring), expert vs tensor parallelism for MoE and the GPT-4-style lab, each with its memory
estimate per rank against every rank's measured peak.

    python benchmarks/parallel_gpu.py [--part validate,fsdp,cp,moe,lab] [--out DIR] [--smoke]

Every figure is an ordinary btune record (``tuner.launch.run_record``). A case lists variants in order (say,
without and with activation checkpointing); the first one ``btune run`` does not refuse before launch (its
estimate under 95% of the GPU) is run, and the refusals are printed. Prints markdown tables; ``--out`` keeps the
records. ``--smoke`` runs the same cases on CPU with tiny shapes (gloo), to check the script, not to measure.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PARTS = ("validate", "fsdp", "cp", "moe", "lab")


def shapes(smoke: bool) -> dict[str, list[str]]:
    """The models each part runs: the real shapes, or tiny ones on CPU."""
    if smoke:
        return {"dense": ["--preset", "tiny-llama", "--device", "cpu"], "moe": ["--preset", "tiny", "--device", "cpu"],
                "gpt4": ["--preset", "tiny", "--device", "cpu"], "seq": ["--seq-len", "128"],
                "long": ["--seq-len", "256"], "half": ["--seq-len", "128"], "steps": ["--steps", "3", "--warmup", "1"],
                "compile": [], "dtype": []}
    return {"dense": ["--preset", "llama-3.1-8b", "--device", "cuda"],
            "moe": ["--preset", "moe-64e-top6", "--device", "cuda", "--layers", "4"],
            "gpt4": ["--preset", "gpt4-style", "--device", "cuda"], "seq": ["--seq-len", "8192"],
            "long": ["--seq-len", "131072"], "half": ["--seq-len", "65536"], "steps": ["--steps", "8", "--warmup", "3"],
            "compile": ["--compile-mode", "default"], "dtype": ["--dtype", "bf16"]}


def cases(part: str, smoke: bool) -> list[tuple[str, list[list[str]]]]:
    """(name, variants) per case: each variant a workload and its options."""
    s = shapes(smoke)
    ac = ["--activation-checkpointing"]
    if part == "validate":
        val = ["tp-validate", *s["dense"], "--layers", "2", "--seq-len", "128" if smoke else "2048", "--batch-size",
               "2", *s["dtype"]]
        moe = ["tp-validate", "--model", "moe", *s["moe"][:2], "--device", s["moe"][3], "--layers", "2",
               "--seq-len", "128" if smoke else "1024", "--batch-size", "1", *s["dtype"]]
        out = [("TP 2", [[*val, "--tp", "2"]]),
               ("FSDP 2", [[*val, "--tp", "1", "--dp-shard", "2"]]),
               ("DDP 2 (replicas)", [[*val, "--tp", "1", "--dp-replicate", "2"]]),
               *((f"CP 2 {a}", [[*val, "--tp", "1", "--cp", "2", "--cp-attention", a]])
                 for a in ("gather", "ring", "ring-gather")),
               ("MoE EP 2 (FSDP 2)", [[*moe, "--tp", "1", "--dp-shard", "2", "--ep", "2"]]),
               ("MoE TP 2", [[*moe, "--tp", "2"]])]
        faults = [("fault missing-allreduce (TP 2)", [[*val, "--tp", "2", "--fault", "missing-allreduce"]]),
                  ("fault skip-grad-sync (FSDP 2)", [[*val, "--tp", "1", "--dp-shard", "2", "--fault",
                                                      "skip-grad-sync"]]),
                  ("fault cp-local-keys (CP 2 ring)", [[*val, "--tp", "1", "--cp", "2", "--cp-attention", "ring",
                                                        "--fault", "cp-local-keys"]]),
                  ("fault ep-misroute (EP 2)", [[*moe, "--tp", "1", "--dp-shard", "2", "--ep", "2", "--fault",
                                                 "ep-misroute"]])]
        return out + faults
    dense = ["dense", *s["dense"], "--tp", "1", "--batch-size", "1", *s["steps"], *s["compile"]]
    if part == "fsdp":
        base = [*dense, *s["seq"], "--dp-shard", "2"]
        return [("FSDP 2, 32 layers" if not smoke else "FSDP 2", [base, [*base, *ac]]),
                ("FSDP 2, reshard off", [[*base, "--reshard-after-forward", "off"],
                                         [*base, "--reshard-after-forward", "off", *ac]])]
    if part == "cp":
        one = [*dense, *s["half"], "--dp-shard", "2"]
        out = [("CP 1 (FSDP 2), half the sequence", [one, [*one, *ac]])]
        for a in ("gather", "ring", "ring-gather"):
            two = [*dense, *s["long"], "--cp", "2", "--cp-attention", a]
            out.append((f"CP 2 {a}", [two, [*two, *ac]]))
        return out
    moe = ["moe", *s["moe"], "--batch-size", "1", *s["steps"], *s["compile"], "--seq-len", "128" if smoke else "4096"]
    if part == "moe":
        return [("MoE EP 2 (FSDP 2)", [[*moe, "--tp", "1", "--dp-shard", "2", "--ep", "2"]]),
                ("MoE TP 2", [[*moe, "--tp", "2"]])]
    if part == "lab":
        lab = ["moe", *s["gpt4"], "--layers", "2", "--tp", "1", "--cp", "2", "--ep", "2", "--batch-size", "1",
               *s["steps"], *(["--seq-len", "256"] if smoke else ["--seq-len", "8192"])]
        return [("GPT-4-style CP 2 x EP 2", [lab, [*lab, *ac]])]
    raise ValueError(part)


def rank_peaks(rec: dict[str, Any]) -> dict[int, int]:
    """Each rank's torch peak: the largest ``mem_peak_mb`` (max_memory_allocated) of its step events (the
    record's summary holds rank 0's only)."""
    out = {}
    for rank, series in ((rec.get("series") or {}).get("step") or {}).items():
        peaks = [p for p in series.get("mem_peak_mb") or [] if isinstance(p, (int, float))]
        if peaks:
            out[int(rank)] = int(max(peaks) * 2**20)
    return out


def run_case(variants: list[list[str]], out: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """The first variant not refused before launch: its record, its arguments, and the refusals before it."""
    from tuner.launch import run_record

    refused: list[str] = []
    rec: dict[str, Any] = {}
    for args in variants:
        rec = run_record(args[0], args[1:], out)
        if rec["status"] != "not launched":
            return rec, args, refused
        refused.append(f"{' '.join(a for a in args[1:] if a.startswith('--activation'))or 'as given'}: "
                       f"{rec['error']['message'][:160]}")
    return rec, variants[-1], refused


def gib(x: Any) -> str:
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"


def validation_row(name: str, rec: dict[str, Any]) -> str:
    w = (rec.get("summary") or {}).get("workload") or {}
    worst = max((t.get("max_rel") or 0 for t in w.get("tensors") or []), default=None)
    expect_fail = name.startswith("fault")
    if rec["status"] == "not launched" or not w:
        verdict = f"{rec['status']}: {(rec.get('error') or {}).get('message', '')[:160]}"
    elif expect_fail:
        verdict = "caught" if not w.get("passed") else "NOT CAUGHT"
    else:
        verdict = "PASS" if w.get("passed") else f"FAIL {str(w.get('mismatches'))[:160]}"
    return (f"| {name} | {len(w.get('tensors') or [])} | {'-' if worst is None else f'{worst:.2e}'} | "
            f"{w.get('tolerance', '-')} | {verdict} |")


def run_row(name: str, rec: dict[str, Any], args: list[str], refused: list[str]) -> str:
    s = rec.get("summary") or {}
    if rec["status"] != "ok":
        why = (rec.get("error") or {}).get("message", "")[:200]
        return f"| {name} | {rec['status']}: {why} | | | | | | | |"
    plan = next((e.get("plan") or {} for e in rec["events"] if e.get("type") == "meta"), {})
    est = (plan.get("memory_estimate_bytes") or {}).get("total")
    peaks = rank_peaks(rec)
    peak = max(peaks.values()) if peaks else None
    err = f"{est / peak - 1:+.1%}" if est and peak else "-"
    mfu = ((s.get("mfu") or {}).get("bf16") or {}).get("value")
    knobs = " ".join(a for a in args if a in ("--activation-checkpointing",)) or "-"
    return (f"| {name} | {knobs} | {s.get('throughput_tokens_per_s') or 0:,.0f} | "
            f"{'-' if mfu is None else f'{mfu * 100:.1f}%'} | {(s.get('step_ms') or {}).get('p50', 0):.0f} | "
            f"{gib(est)} | {' / '.join(gib(peaks[r]) for r in sorted(peaks))} | {err} | "
            f"{'; '.join(refused) or '-'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="keep the records here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    parts = [p for p in args.part.split(",") if p]
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)
    if args.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
           else "CPU (smoke)")
    print(f"{gpu}, torch {torch.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(args.out or tmp)
        for part in parts:
            if part == "validate":
                print("| tp-validate (bf16 on a GPU) | tensors | worst rel err | tolerance | result |")
                print("|---|---:|---:|---:|---|")
                for name, variants in cases(part, args.smoke):
                    rec, _, _ = run_case(variants, out)
                    print(validation_row(name, rec), flush=True)
            else:
                print(f"\n| {part} | checkpointing | tokens/s | MFU (bf16) | step p50 ms | estimate GiB per rank | "
                      "peak GiB per rank | estimate error | refused before launch |")
                print("|---|---|---:|---:|---:|---:|---:|---:|---|")
                for name, variants in cases(part, args.smoke):
                    rec, used, refused = run_case(variants, out)
                    print(run_row(name, rec, used, refused), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
