"""MoE workload on one GPU: grouped vs loop experts, grouped-GEMM efficiency, cost of the balance metrics.

The moe-64e-top6 preset (d 7168, 64 routed experts of width 2048, top-6, 2 shared) truncated to fit one GPU,
batch 1, bf16, training. Every whole-model figure comes from a real `python -m tuner run moe ...` record;
the GEMM and MoE-layer figures from in-process CUDA-event timings (median of 20 after 5 warm-up).
usage: python benchmarks/moe.py [--layers 2] [--num-moe-layers 1] [--seq-len 4096]
                                [--part all|runs|metrics|gemm|layer]
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

from tuner.launch import run_record


def btune_run(args: list[str], out: str) -> dict[str, Any]:
    """A MoE run through the console core (tuner.launch.run_record), as `btune run moe ARGS` runs it."""
    return run_record("moe", args, out)


def _ok(rec: dict[str, Any]) -> bool:
    return rec.get("status") == "ok" and bool(rec.get("summary", {}).get("throughput_tokens_per_s"))


def _why(rec: dict[str, Any]) -> str:
    return f"{rec.get('status')}: {((rec.get('error') or {}).get('message') or '')[:120]}"


def part_runs(base: list[str], out: str) -> dict[str, dict[str, Any]]:
    runs = {
        "grouped (auto)": [*base, "--expert-impl", "grouped"],
        "loop": [*base, "--expert-impl", "loop"],
        "grouped, compiled (default)": [*base, "--expert-impl", "grouped", "--compile-mode", "default"],
    }
    print("| experts | GEMM | tokens/s | step p50 ms | MFU (bf16, active) | torch peak GiB | gini (last window) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    recs = {}
    for label, args in runs.items():
        rec = recs[label] = btune_run(args, out)
        if not _ok(rec):
            print(f"| {label} | {_why(rec)} | | | | | |", flush=True)
            continue
        s = rec["summary"]
        meta = next(e for e in rec["events"] if e["type"] == "meta")
        gemm = meta["backends"]["experts"]["gemm"]
        mfu = s["mfu"]["bf16"]["value"]
        gini = ((s.get("experts") or {}).get("mean") or {}).get("gini")
        print(f"| {label} | {gemm} | {s['throughput_tokens_per_s']:,.0f} | {s['step_ms']['p50']:.1f} | "
              f"{f'{mfu * 100:.1f}%' if mfu else '-'} | {(s.get('torch_mem_peak_mb') or 0) / 1024:.1f} | "
              f"{f'{gini:.3f}' if gini is not None else '-'} |", flush=True)
    g, lp = recs["grouped (auto)"], recs["loop"]
    if _ok(g) and _ok(lp):
        ratio = g["summary"]["throughput_tokens_per_s"] / lp["summary"]["throughput_tokens_per_s"]
        print(f"\nwhole model: grouped / loop tokens/s = {ratio:.2f}x (target >= 4x)")
        meta = next(e for e in g["events"] if e["type"] == "meta")
        print(f"grouped ran: {meta['backends']['experts']['reason']}")
    return recs


def part_metrics(base: list[str], out: str, repeats: int = 3) -> None:
    """Step time with and without balance metrics, runs alternated; medians of each run's step p50."""
    p50: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeats):
        for flag in ("on", "off"):
            rec = btune_run([*base, "--expert-impl", "grouped", "--balance-metrics", flag], out)
            if not _ok(rec):
                print(f"metrics {flag}: {_why(rec)}")
                return
            p50[flag].append(rec["summary"]["step_ms"]["p50"])
    on, off = statistics.median(p50["on"]), statistics.median(p50["off"])
    print("\n| balance metrics | step p50 ms (median of runs) | runs |")
    print("|---|---:|---|")
    for flag, med in (("on", on), ("off", off)):
        print(f"| {flag} | {med:.2f} | {', '.join(f'{x:.2f}' for x in p50[flag])} |")
    print(f"\ncost of balance metrics: {(on / off - 1) * 100:+.2f}% of step time (target <= 2%)")


def median_event_ms(fn: Callable[[], Any], warmup: int = 5, iters: int = 20) -> float:
    """Median ms of ``fn`` on the GPU over ``iters`` calls, each timed by CUDA events, after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _assignments(n: int, e: int, k: int, skew: float) -> Any:
    """Expert ids [n, k] (distinct per token): uniform, or with expert popularity ∝ 1/rank^skew."""
    import torch

    weights = torch.arange(1, e + 1, dtype=torch.float).pow(-skew).expand(n, e)
    return torch.multinomial(weights, k, replacement=False, generator=torch.Generator().manual_seed(0)).cuda()


def part_gemm(tokens: int) -> None:
    """Grouped expert GEMMs (torch._grouped_mm) vs a dense bf16 GEMM of the same FLOPs, forward and fwd+bwd."""
    import torch

    from workloads.models.moe_config import MOE_PRESETS

    cfg = MOE_PRESETS["moe-64e-top6"]
    e, k, d, f = cfg.n_experts, cfg.top_k, cfg.base.d_model, cfg.expert_d_ff
    nk = tokens * k
    bf = torch.bfloat16
    w13 = torch.randn(e, 2 * f, d, device="cuda", dtype=bf, requires_grad=True)
    w2 = torch.randn(e, d, f, device="cuda", dtype=bf, requires_grad=True)
    d13 = torch.randn(d, 2 * f, device="cuda", dtype=bf, requires_grad=True)
    d2 = torch.randn(f, d, device="cuda", dtype=bf, requires_grad=True)
    x = torch.randn(nk, d, device="cuda", dtype=bf, requires_grad=True)
    h = torch.randn(nk, f, device="cuda", dtype=bf, requires_grad=True)
    flops_fwd = 2 * nk * d * 2 * f + 2 * nk * f * d
    print(f"\n{tokens} tokens × top-{k} = {nk} rows over {e} experts, d {d}, expert width {f} (w13 fused: {2 * f})")
    print("| routing | pass | grouped ms | grouped TFLOP/s | dense GEMM ms | dense TFLOP/s | grouped / dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, skew in (("uniform", 0.0), ("skewed (popularity ∝ 1/rank)", 1.0)):
        idx = _assignments(tokens, e, k, skew).flatten()
        counts = torch.bincount(idx, minlength=e)
        offs = counts.cumsum(0).to(torch.int32)

        def grouped_fwd(offs: Any = offs) -> None:
            torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
            torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)

        def dense_fwd() -> None:
            torch.mm(x, d13)
            torch.mm(h, d2)

        def grouped_fb(offs: Any = offs) -> None:
            a = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
            b = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
            torch.autograd.backward([a, b], [torch.ones_like(a), torch.ones_like(b)])

        def dense_fb() -> None:
            a, b = torch.mm(x, d13), torch.mm(h, d2)
            torch.autograd.backward([a, b], [torch.ones_like(a), torch.ones_like(b)])

        try:
            with torch.no_grad():
                g_ms, d_ms = median_event_ms(grouped_fwd), median_event_ms(dense_fwd)
            gb_ms, db_ms = median_event_ms(grouped_fb), median_event_ms(dense_fb)
        except RuntimeError as exc:
            print(f"| {label} | failed: {str(exc).splitlines()[0][:100]} | | | | | |")
            continue
        for pas, gm, dm, fl in (("forward", g_ms, d_ms, flops_fwd), ("fwd+bwd", gb_ms, db_ms, 3 * flops_fwd)):
            gt, dt = fl / gm / 1e9, fl / dm / 1e9
            print(f"| {label} (max/mean load {counts.max().item() / counts.float().mean().item():.2f}) | {pas} | "
                  f"{gm:.3f} | {gt:.0f} | {dm:.3f} | {dt:.0f} | {gt / dt * 100:.0f}% |", flush=True)
    print("(target: grouped >= 50% of the dense GEMM's TFLOP/s)")


def part_layer(tokens: int) -> None:
    """One moe-64e-top6 MoE FFN (router, 64 experts top-6, 2 shared) fwd+bwd: loop vs grouped."""
    import torch

    from workloads.models.moe import MoEFFN
    from workloads.models.moe_config import MOE_PRESETS
    from workloads.models.moe_experts import grouped_gemm_backend

    cfg = MOE_PRESETS["moe-64e-top6"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = MoEFFN(cfg).to(torch.bfloat16)
    x = torch.randn(1, tokens, cfg.base.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gemm, reason = grouped_gemm_backend(torch.device("cuda"), torch.bfloat16, cfg.base.d_model, cfg.expert_d_ff)
    print(f"\nMoE FFN fwd+bwd, {tokens} tokens ({reason})")
    print("| experts | GEMM | ms | vs loop |")
    print("|---|---|---:|---:|")
    base_ms = None
    for impl, g in (("loop", "bmm"), ("grouped", "bmm"), ("grouped", gemm)):
        layer.experts.impl, layer.experts.gemm = impl, g

        def fb() -> None:
            y = layer(x)[0]
            y.sum().backward()

        try:
            ms = median_event_ms(fb, warmup=3, iters=10)
        except RuntimeError as exc:
            print(f"| {impl} | {g} | failed: {str(exc).splitlines()[0][:100]} | |")
            continue
        base_ms = base_ms or ms
        print(f"| {impl} | {g if impl == 'grouped' else '-'} | {ms:.2f} | {base_ms / ms:.2f}x |", flush=True)
        if impl == "grouped" and g == gemm:
            break


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--num-moe-layers", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--part", default="all", choices=("all", "runs", "metrics", "gemm", "layer"))
    args = ap.parse_args()
    import torch

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"moe-64e-top6 shapes truncated to {args.layers} layers ({args.num_moe_layers} MoE), batch 1, "
          f"seq {args.seq_len}, bf16, train\n")
    base = ["--preset", "moe-64e-top6", "--layers", str(args.layers), "--num-moe-layers", str(args.num_moe_layers),
            "--batch-size", "1", "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", "5",
            "--dtype", "bf16"]
    with tempfile.TemporaryDirectory() as out:
        if args.part in ("all", "runs"):
            part_runs(base, out)
        if args.part in ("all", "metrics"):
            part_metrics(base, out)
    if args.part in ("all", "gemm"):
        part_gemm(args.seq_len)
    if args.part in ("all", "layer"):
        part_layer(args.seq_len)


if __name__ == "__main__":
    main()
