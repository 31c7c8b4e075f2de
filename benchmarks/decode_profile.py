"""Where a decode step's fixed time goes on this GPU: each GEMM shape alone, and the engine's step kernel by
kernel.

1. The copy bandwidth (the roofline's ceiling).
2. Each projection of llama-3.1-8b (q/k/v fused, o, gate/up fused, down, the LM head) as ``F.linear`` at batch
   1, 8, 32, 64: microseconds and achieved bandwidth (weights rotated over copies larger than L2, captured in a
   CUDA graph so launch cost is the GPU's own).
3. The engine's decode step at ``--layers`` (CUDA graphs): compile seconds, the graph alone, ``Engine.run``, and
   the profile of 20 replays: kernels per step, their summed time, the time between them (the step minus the
   kernels), and the kernels by total time.

usage: python benchmarks/decode_profile.py [--layers 32] [--batches 1] [--part all|gemm|step] [--settings base,pdl]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from serve import copy_bandwidth  # benchmarks/serve.py
from serve_decode import apply, build, kernels_markdown, measure, read_bytes, step_kernels

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "head": (128256, 4096)}


def graph_time(fn, reps: int = 20) -> float:
    """Milliseconds per call of ``fn`` captured ``reps`` times in one CUDA graph (median of 10 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return sorted(times)[len(times) // 2]


def part_gemm(bw: float, batches: list[int]) -> None:
    print("| projection | N x K | batch | us | GB/s | % of copy bw |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(400e6 // (n * k * 2)) + 1)  # > L2 (50 MB) many times over
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            ms = graph_time(lambda i, x=x, ws=ws, copies=copies: F.linear(x, ws[i % copies]))
            gbs = n * k * 2 / (ms / 1000) / 1e9
            print(f"| {name} | {n} x {k} | {b} | {ms * 1000:.1f} | {gbs:,.0f} | {gbs * 1e9 / bw * 100:.1f}% |",
                  flush=True)
        del ws
        torch.cuda.empty_cache()


def _mlp(layout: str):
    """A SwiGLU MLP at decode: gate/up one GEMM in ``layout`` (interleaved rows, or gate then up), SiLU x up, down
    (``materialize``: the product through a graph break, so the down GEMV reads it instead of recomputing it)."""
    def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w13)
        if layout.startswith("interleaved"):
            pairs = y.view(*y.shape[:-1], -1, 2)
            g, u = pairs[..., 0], pairs[..., 1]
        else:
            g, u = y.chunk(2, dim=-1)
        a = F.silu(g) * u
        return x + F.linear(a, w2)
    return mlp


def _attn_front(layout: str, nq: int, nkv: int, hd: int):
    """RMSNorm, the q/k/v GEMV and RoPE at decode, the fused weight grouped by KV head or q|k|v."""
    from workloads.models.norms import rms_norm
    from workloads.models.rope import rotate

    def front(x: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b = x.shape[0]
        y = F.linear(rms_norm(x, nw, 1e-5), w)
        if layout == "grouped":
            g = y.view(b, 1, nkv, nq // nkv + 2, hd)
            q, k, v = g[..., :nq // nkv, :].flatten(-3, -2), g[..., -2, :], g[..., -1, :]
        else:
            q, k, v = y.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.view(b, 1, nq, hd), k.view(b, 1, nkv, hd), v.view(b, 1, nkv, hd)
        return rotate(q, cos, sin), rotate(k, cos, sin), v.contiguous()
    return front


def part_layouts(bw: float, batches: list[int], layers: int = 8) -> None:
    """Each layout's piece compiled as the engine compiles a decode block, over ``layers`` weight sets (more than
    L2) in one CUDA graph: microseconds per layer."""
    from workloads.engine.engine import decode_options

    opts = decode_options("default")
    d, f, nq, nkv, hd = 4096, 14336, 32, 8, 128
    dev, bf = "cuda", torch.bfloat16
    w13 = [torch.randn(2 * f, d, device=dev, dtype=bf) * 0.02 for _ in range(layers)]
    w2 = [torch.randn(d, f, device=dev, dtype=bf) * 0.02 for _ in range(layers)]
    wqkv = [torch.randn((nq + 2 * nkv) * hd, d, device=dev, dtype=bf) * 0.02 for _ in range(layers)]
    nw = torch.ones(d, device=dev, dtype=bf)
    print("| piece | layout | batch | us per layer | GB/s |")
    print("|---|---|---:|---:|---:|")
    for b in batches:
        x = torch.randn(b, 1, d, device=dev, dtype=bf)
        cos, sin = torch.randn(b, 1, 1, hd, device=dev), torch.randn(b, 1, 1, hd, device=dev)
        for layout in ("interleaved", "halves"):
            torch._dynamo.reset()
            fn = torch.compile(_mlp(layout), options=opts, dynamic=False)
            ms = graph_time(lambda i, fn=fn, x=x: fn(x, w13[i % layers], w2[i % layers]), reps=layers)
            gbs = 3 * f * d * 2 / (ms / 1000) / 1e9
            print(f"| mlp | {layout} | {b} | {ms * 1000:.1f} | {gbs:,.0f} |", flush=True)
        for layout in ("grouped", "concatenated"):
            torch._dynamo.reset()
            fn = torch.compile(_attn_front(layout, nq, nkv, hd), options=opts, dynamic=False)
            ms = graph_time(lambda i, fn=fn, x=x, cos=cos, sin=sin: fn(x, nw, wqkv[i % layers], cos, sin),
                            reps=layers)
            gbs = (nq + 2 * nkv) * hd * d * 2 / (ms / 1000) / 1e9
            print(f"| norm+qkv+rope | {layout} | {b} | {ms * 1000:.1f} | {gbs:,.0f} |", flush=True)


def part_step(bw: float, layers: int, batches: list[int], variant: str, top: int) -> None:
    t0 = time.perf_counter()
    engine = build(layers, variant, max(batches), 1024)
    print(f"\nengine {variant}, {layers} layers, built in {time.perf_counter() - t0:.1f} s")
    for b in batches:
        c, gpu, step = measure(engine, b, 640)
        roof = read_bytes(engine, b, 640) / bw * 1000.0
        print(f"batch {b}: compile+capture {c:.1f} s, graph {gpu:.3f} ms, Engine.run {step:.3f} ms, roofline "
              f"{roof:.3f} ms ({roof / gpu * 100:.1f}% graph, {roof / step * 100:.1f}% run)", flush=True)
        count, total, rows = step_kernels(engine, b, 640)
        print(f"  kernels per step {count:.0f}, their sum {total:.3f} ms, between them "
              f"{gpu - total:.3f} ms ({(gpu - total) / count * 1000:.2f} us a kernel)")
        print(kernels_markdown(rows, top))
    del engine
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--gemm-batches", default="1,8,32,64")
    ap.add_argument("--variant", default="flex")
    ap.add_argument("--part", default="all", choices=("all", "gemm", "step", "layouts"))
    ap.add_argument("--settings", default="base", help="library settings, each its own compile (serve_decode.py)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per profile")
    args = ap.parse_args()
    bw = copy_bandwidth("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    if args.part in ("all", "gemm"):
        part_gemm(bw, [int(x) for x in args.gemm_batches.split(",")])
    if args.part in ("all", "layouts"):
        part_layouts(bw, [int(x) for x in args.gemm_batches.split(",")])
    if args.part in ("all", "step"):
        for setting in args.settings.split(","):
            torch._dynamo.reset()
            apply(setting)
            print(f"\n## settings {setting}")
            part_step(bw, args.layers, [int(x) for x in args.batches.split(",")], args.variant, args.top)


if __name__ == "__main__":
    main()
