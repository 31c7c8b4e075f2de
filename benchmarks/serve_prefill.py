"""Prefill chunk time: the eager prefill against the engine's compiled one (each block one graph every layer shares,
around the eager cache write and attention), side by side on the same model and cache.

The llama-3.1-8b shapes truncated to ``--layers``, bf16. For each chunk (length, start), the GPU time of one chunk
(the median of ``--reps`` chunks timed by CUDA events after warm-up, host gaps included; and the
GPU kernels' own time per chunk, from the profiler), the GEMM throughput that implies (2 x tokens x the blocks'
matmul weights, over the chunk time), and how far the compiled chunk's keys and next token are from the eager one's.

usage: python benchmarks/serve_prefill.py [--layers 32] [--chunks 512@0,2048@0,512@512] [--reps 10]
"""

from __future__ import annotations

import argparse
import datetime
import time
from functools import partial

import torch
from moe import median_event_ms  # benchmarks/moe.py
from serve_decode import llama_model  # benchmarks/serve_decode.py

from workloads.engine.engine import Engine
from workloads.engine.forward import prefill_chunk
from workloads.models.attention import AttentionKernel


def gpu_ms(fn, reps: int) -> tuple[float, float]:
    """(median ms of one chunk by CUDA events, host gaps included; ms of GPU kernels per chunk, by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    median = median_event_ms(fn, warmup=3, iters=reps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = sum(evt.self_device_time_total for evt in prof.key_averages()) / 1000.0 / reps
    return median, kernels


def kernel_table(fn, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chunks", default="512@0,2048@0,512@512", help="length@start, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print each chunk's top GPU kernels, eager and compiled")
    args = ap.parse_args()
    kernel = AttentionKernel("auto")
    model = llama_model(args.layers, kernel)
    engine = Engine(model, kernel, 2, 4096, torch.device("cuda"), torch.bfloat16, "reduce-overhead")
    assert engine._prefill_block is not None

    def compiled(slot: int, tokens: torch.Tensor, start: int, last: int) -> torch.Tensor:
        return prefill_chunk(model, engine.cache, slot, tokens, start, last, engine._prefill_block, engine._wrap)

    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(1, torch.zeros(1, 16, dtype=torch.long, device="cuda"), 0, 15)
        compiled(1, torch.zeros(1, 1, dtype=torch.long, device="cuda"), 0, 0)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    matmul = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, llama-3.1-8b x "
          f"{args.layers} layers, bf16, SDPA; compiled prefill's compile: {compile_s:.1f} s\n")
    print("| chunk tokens | start | eager ms | compiled ms | speed-up | eager kernels ms | compiled kernels ms "
          "| kernels speed-up | compiled TFLOP/s | keys max abs diff | same next token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for chunk in args.chunks.split(","):
        n, start = (int(x) for x in chunk.split("@"))
        tokens = torch.randint(0, model.cfg.vocab_size, (1, start + n), device="cuda", generator=gen)
        with torch.inference_mode():
            if start:  # the earlier part of the prompt, in both slots
                prefill_chunk(model, engine.cache, 0, tokens[:, :start], 0, start - 1)
                compiled(1, tokens[:, :start], 0, start - 1)
            piece = tokens[:, start:]
            eager_tok = prefill_chunk(model, engine.cache, 0, piece, start, n - 1)
            comp_tok = compiled(1, piece, start, n - 1)
            diff = max((k[1, :, start:start + n].float() - k[0, :, start:start + n].float()).abs().max().item()
                       for k in engine.cache.k)
            eager = partial(prefill_chunk, model, engine.cache, 0, piece, start, n - 1)
            fast = partial(compiled, 1, piece, start, n - 1)
            (e_ms, e_k), (c_ms, c_k) = gpu_ms(eager, args.reps), gpu_ms(fast, args.reps)
            if args.profile:
                for label, fn in (("eager", eager), ("compiled", fast)):
                    print(f"{label}, {n}@{start}:\n{kernel_table(fn)}")
        flop = 2 * n * matmul
        print(f"| {n} | {start} | {e_ms:.3f} | {c_ms:.3f} | {e_ms / c_ms:.3f}x | {e_k:.3f} | {c_k:.3f} | "
              f"{e_k / c_k:.3f}x | {flop / c_ms / 1e9:.0f} | {diff:.3g} | {eager_tok.item() == comp_tok.item()} |",
              flush=True)


if __name__ == "__main__":
    main()
