"""Energy and MBU against independent readings, on one GPU (issue 15).

1. Energy: a dense training run and a serving run through the console core (tuner.launch), while this script
   reads the NVML total-energy counter of the same GPU itself every 20 ms in a thread. The record's energy
   (its first and last counter readings) is checked against this script's own counter series interpolated
   at those two moments, and against the record's integrated power; the record must charge exactly the GPU
   the workload opened (its UUID, matched to NVML's).
2. MBU of batch-1 decode: `dense --mode decode --batch-size 1` (eager and CUDA-graphed), printed beside an
   independent floor: the weight bytes of the model (parameters of a meta-device copy, embedding tables
   out) over the copy bandwidth this script measures (a device-to-device copy of 4 GiB, read + write).

usage: python benchmarks/energy_mbu.py [--preset llama-3.1-8b] [--out DIR]
"""

from __future__ import annotations

import argparse
import bisect
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.launch import build_config, make_runner  # noqa: E402


class CounterReader:
    """This script's own NVML energy readings of GPU ``index``: (time.time(), joules), every ``period`` s."""

    def __init__(self, index: int = 0, period: float = 0.02) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        self.uuid = pynvml.nvmlDeviceGetUUID(self.handle)
        self.period, self.points = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.points.append((time.time(), mj / 1000.0))
            self._stop.wait(self.period)

    def __enter__(self) -> CounterReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """The counter at time ``t``, linearly interpolated between this reader's samples."""
        ts = [p[0] for p in self.points]
        i = min(max(bisect.bisect_left(ts, t), 1), len(ts) - 1)
        (t0, j0), (t1, j1) = self.points[i - 1], self.points[i]
        return j0 + (j1 - j0) * (t - t0) / (t1 - t0) if t1 > t0 else j1


def run(workload: str, args: list[str], out: Path) -> dict:
    return make_runner(build_config(workload, args), out).run().record


def energy_row(label: str, rec: dict, reader: CounterReader) -> str:
    s = rec["summary"]
    cols = (rec["series"].get("energy") or {}).get("0") or {}
    ts = cols.get("t") or []
    if rec["status"] != "ok" or len(ts) < 2:
        return f"| {label} | {rec['status']}: {(rec.get('error') or {}).get('message')} | | | | | |"
    mine = reader.at(ts[-1]) - reader.at(ts[0])
    integrated = ((s.get("gpu") or {}).get("0") or {}).get("energy_integrated_j")
    metas = [e for e in rec["events"] if e.get("type") == "meta"]
    uuid_ok = all(reader.uuid.lower().endswith(str(e.get("device_uuid")).lower()) for e in metas)
    return (f"| {label} | {s['energy_j']:,.1f} | {mine:,.1f} | {(s['energy_j'] / mine - 1) * 100:+.2f}% | "
            f"{integrated:,.1f} | {s.get('energy_gpus')} (uuid {'match' if uuid_ok else 'MISMATCH'}) | "
            f"{s.get('joules_per_token') or 0:.4g} |")


def copy_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    import torch

    n = int(gib * 2**30)
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    secs = start.elapsed_time(end) / 1000.0
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * reps / secs


def weight_bytes(preset: str) -> int:
    """The bf16 bytes a decode step reads of the weights, from a meta-device model's parameters."""
    import torch

    from workloads.models.config import PRESETS
    from workloads.models.transformer import Transformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(p.numel() * p.element_size() for n, p in params.items()
               if n not in ("tok_embeddings.weight", "pos_embeddings.weight"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", nargs="+", default=["dense", "serve", "decode"], choices=["dense", "serve", "decode"])
    ap.add_argument("--request-rate", default="2")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="btune-energy-"))
    import torch

    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| run | record energy J | own NVML counter J (same moments) | diff | integrated power J | "
          "GPUs charged | J/token (steady) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    with CounterReader(0) as reader:
        if "dense" in a.parts:
            dense = run("dense", ["--preset", "llama-3.1-8b", "--layers", "4", "--batch-size", "4", "--seq-len", "2048",
                                  "--duration", "20", "--warmup", "3"], out)
            print(energy_row("dense llama-3.1-8b (4 layers) train b4 s2048, 20 s", dense, reader), flush=True)
        if "serve" in a.parts:
            serve = run("serve", ["--preset", a.preset, "--duration", "20", "--request-rate", a.request_rate], out)
            print(energy_row(f"serve {a.preset}, {a.request_rate} req/s, 20 s", serve, reader), flush=True)
            ss, mbu = serve["summary"], serve["summary"].get("mbu") or {}
            sv = ss.get("serving") or {}
            print(f"\nserve MBU {(mbu.get('value') or 0) * 100:.1f}% ({mbu.get('achieved_tb_s')} TB/s); TTFT p50 "
                  f"{sv['ttft_ms']['p50']:.1f} ms, TPOT p50 {sv['tpot_ms']['p50']:.2f} ms, "
                  f"goodput {sv['goodput']:.2f} req/s")
    if "decode" not in a.parts:
        return
    bw = copy_bandwidth()
    wb = weight_bytes(a.preset)
    floor_ms = wb / bw * 1000
    print(f"\nmeasured copy bandwidth {bw / 1e12:.3f} TB/s; {a.preset} weights {wb / 1e9:.3f} GB "
          f"-> floor {floor_ms:.3f} ms per batch-1 decode step\n")
    print("| decode batch 1, context 1024 | step p50 ms | btune MBU (of 4.8 TB/s) | btune bytes/s TB/s | "
          "floor / step (weights / copy BW) |")
    print("|---|---:|---:|---:|---:|")
    for label, extra in (("eager", []), ("compile reduce-overhead", ["--compile-mode", "reduce-overhead"])):
        rec = run("dense", ["--preset", a.preset, "--mode", "decode", "--batch-size", "1", "--seq-len", "1024",
                            "--steps", "200", "--warmup", "5", *extra], out)
        if rec["status"] != "ok":
            print(f"| {label} | {rec['status']}: {(rec.get('error') or {}).get('message')} | | | |")
            continue
        s = rec["summary"]
        p50 = s["step_ms"]["p50"]
        print(f"| {label} | {p50:.3f} | {s['mbu']['value'] * 100:.1f}% | {s['mbu']['achieved_tb_s']:.3f} | "
              f"{floor_ms / p50 * 100:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
