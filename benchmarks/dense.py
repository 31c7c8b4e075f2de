"""Dense workload on one GPU: MFU, FP8, attention backends, long context, and Hugging Face side by side.

Every btune figure comes from a real `python -m tuner run dense ...` record; the Hugging Face figures
come from LlamaForCausalLM (transformers) with the same config, layers, batch, sequence, dtype,
loss and AdamW, timed the same way (CUDA events around each step, warm-up excluded, median step).
usage: python benchmarks/dense.py [--layers 8] [--part all|btune|hf|attention]
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from tuner.launch import run_record


def btune_run(args: list[str], out: str) -> dict[str, Any]:
    """A dense run through the console core (tuner.launch.run_record), as `btune run dense ARGS` runs it."""
    rec = run_record("dense", args, out)
    if rec["status"] == "not launched":
        return {"status": "not launched", "error": rec["error"]["message"]}
    return rec


def row(label: str, rec: dict[str, Any]) -> str:
    if "summary" not in rec:
        return f"| {label} | {rec['status']}: {rec['error'][:120]} | | | | |"
    s = rec["summary"]
    if rec["status"] != "ok":
        err = (rec.get("error") or {}).get("message") or ""
        return f"| {label} | {rec['status']}: {err[:120]} | | | | |"
    mfu = s["mfu"]["bf16"]["value"]
    fp8 = (s["mfu"].get("fp8") or {}).get("value")
    wl = s.get("workload") or {}
    peak = (s.get("torch_mem_peak_mb") or 0) / 1024
    comp = wl.get("compile_s")
    return (f"| {label} | {s['throughput_tokens_per_s']:,.0f} | {s['step_ms']['p50']:.1f} | "
            f"{(mfu or 0) * 100:.1f}%{f' / {fp8 * 100:.1f}% fp8' if fp8 else ''} | {peak:.1f} | "
            f"{f'{comp:.0f}' if comp else '-'} |")


def part_btune(layers: int, out: str) -> dict[str, dict[str, Any]]:
    base = ["--preset", "llama-3.1-8b", "--layers", str(layers), "--batch-size", "1", "--seq-len", "8192",
            "--steps", "20", "--warmup", "5"]
    runs = {
        "train bf16 eager": base,
        "train bf16 compiled": [*base, "--compile-mode", "default"],
        "train fp8 torchao tensorwise compiled": [*base, "--compile-mode", "default", "--fp8-mode", "torchao",
                                                  "--fp8-recipe", "tensorwise"],
        "train fp8 torchao rowwise compiled": [*base, "--compile-mode", "default", "--fp8-mode", "torchao",
                                               "--fp8-recipe", "rowwise"],
        "train fp8 te": [*base, "--fp8-mode", "te"],
        "train fp8 auto compiled": [*base, "--compile-mode", "default", "--fp8-mode", "auto"],
        "prefill bf16 eager": [*base, "--mode", "prefill"],
        "prefill bf16 compiled": [*base, "--mode", "prefill", "--compile-mode", "default"],
        "train seq 16384 bs1 compiled + AC": [*base[:6], "--seq-len", "16384", "--steps", "10", "--warmup", "3",
                                              "--compile-mode", "default", "--activation-checkpointing"],
    }
    recs = {}
    print("| run | tokens/s | step p50 ms | MFU (bf16 peak) | torch peak GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, args in runs.items():
        recs[label] = btune_run(args, out)
        print(row(label, recs[label]), flush=True)
    return recs


def fp8_tracking(out: str, layers: int) -> None:
    """Loss of bf16 and FP8 (torchao tensorwise) over 50 steps, same seed and data."""
    base = ["--preset", "llama-3.1-8b", "--layers", str(layers), "--batch-size", "1", "--seq-len", "4096",
            "--steps", "45", "--warmup", "5", "--compile-mode", "default", "--lr", "1e-4"]
    a = btune_run(base, out)
    b = btune_run([*base, "--fp8-mode", "torchao"], out)
    if a.get("status") != "ok" or b.get("status") != "ok":
        print(f"fp8 tracking: bf16 {a.get('status')}, fp8 {b.get('status')} {b.get('error')}")
        return
    la, lb = a["series"]["step"]["0"]["loss"], b["series"]["step"]["0"]["loss"]
    diffs = [abs(x - y) for x, y in zip(la, lb, strict=True)]
    print(f"\nFP8 loss tracking over {len(la)} steps: bf16 {la[0]:.3f} -> {la[-1]:.3f}, "
          f"fp8 {lb[0]:.3f} -> {lb[-1]:.3f}, max |diff| {max(diffs):.3f}, last-10 mean |diff| "
          f"{statistics.mean(diffs[-10:]):.4f}")


def hf_child(layers: int, mode: str, compiled: bool) -> None:
    """One Hugging Face measurement (run in its own process): prints the median step ms and tokens/s."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8193), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    fwd = torch.compile(model) if compiled else model
    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

        def step() -> None:
            logits = fwd(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                fwd(input_ids=x)
    times = []
    for i in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        if i >= 5:
            times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    print(f"RESULT {ms:.3f} {8192 / (ms / 1000):.1f}")


def part_hf(layers: int, recs: dict[str, dict[str, Any]]) -> None:
    print("\n| Hugging Face LlamaForCausalLM (same shapes) | step p50 ms | tokens/s | btune / HF |")
    print("|---|---:|---:|---:|")
    best: dict[str, float] = {}
    for mode in ("train", "prefill"):
        for compiled in (False, True):
            res = subprocess.run([sys.executable, __file__, "--hf-child", mode, str(int(compiled)), "--layers",
                                  str(layers)], capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
            label = f"{mode} {'compiled' if compiled else 'eager'}"
            if line is None:
                print(f"| {label} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:100]} | | |")
                continue
            ms, tps = map(float, line.split()[1:])
            best[mode] = max(best.get(mode, 0.0), tps)
            ours = max((r["summary"]["throughput_tokens_per_s"] for k, r in recs.items()
                        if k.startswith(f"{mode} bf16") and r.get("status") == "ok"), default=None)
            print(f"| {label} | {ms:.1f} | {tps:,.0f} | {ours / tps:.2f}x |" if ours else f"| {label} | {ms:.1f} | "
                  f"{tps:,.0f} | - |", flush=True)
    for mode, tps in best.items():
        ours = max((r["summary"]["throughput_tokens_per_s"] for k, r in recs.items()
                    if k.startswith(f"{mode} bf16") and r.get("status") == "ok"), default=None)
        if ours:
            print(f"{mode}: btune best bf16 {ours:,.0f} tok/s vs HF best {tps:,.0f} tok/s = {ours / tps:.2f}x")


def part_attention() -> None:
    """Causal attention fwd+bwd at llama-3.1-8b head shapes: flash, cudnn, efficient, flex; agreement with flash."""
    import torch

    from workloads.models.attention import make_kernel

    print("\n| seq | backend | fwd+bwd ms | vs flash | max abs err vs flash (out) |")
    print("|---:|---|---:|---:|---:|")
    for seq in (8192, 16384):
        torch.manual_seed(0)
        q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ref = None
        flash_ms = None
        for name in ("flash", "cudnn", "efficient", "flex"):
            try:
                kernel, _ = make_kernel(name, "cuda", torch.bfloat16, n_heads=32, n_kv_heads=8, head_dim=128,
                                        seq_len=seq, training=True)
                mask = kernel.mask(seq, seq, torch.device("cuda"))
                times = []
                for i in range(13):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    out = kernel(q, k, v, mask)
                    out.sum().backward()
                    b.record()
                    b.synchronize()
                    if i >= 3:
                        times.append(a.elapsed_time(b))
                ms = statistics.median(times)
                out = kernel(q, k, v, mask).detach().float()
                if ref is None:
                    ref, flash_ms = out, ms
                err = (out - ref).abs().max().item()
                print(f"| {seq} | {name} | {ms:.2f} | {ms / flash_ms:.2f}x | {err:.4f} |", flush=True)
            except Exception as exc:  # a kernel this GPU cannot run: say so, go on
                print(f"| {seq} | {name} | not run: {str(exc).splitlines()[0][:90]} | | |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--part", default="all", choices=("all", "btune", "hf", "attention", "fp8track"))
    ap.add_argument("--hf-child", nargs=2)
    args = ap.parse_args()
    if args.hf_child:
        hf_child(args.layers, args.hf_child[0], bool(int(args.hf_child[1])))
        return
    import torch

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"llama-3.1-8b shapes truncated to {args.layers} layers, batch 1, seq 8192\n")
    with tempfile.TemporaryDirectory() as out:
        recs: dict[str, dict[str, Any]] = {}
        if args.part in ("all", "btune"):
            recs = part_btune(args.layers, out)
        if args.part in ("all", "hf"):
            part_hf(args.layers, recs)
        if args.part in ("all", "attention"):
            part_attention()
        if args.part in ("all", "fp8track"):
            fp8_tracking(out, args.layers)


if __name__ == "__main__":
    main()
