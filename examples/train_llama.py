"""A user's own training script, reporting to btune through its API: a small Llama (Hugging Face transformers) on
random tokens, plain PyTorch loop.

    btune run -- python examples/train_llama.py --steps 50            # under btune: live panels, a record
    btune run --memory-profile 3 -- python examples/train_llama.py    # and a CUDA memory snapshot
    python examples/train_llama.py                                    # alone: the btune calls do nothing

It measures itself too (``--out FILE``: its own steady tokens/s from CUDA-synchronised wall time, its MFU from
the same FLOPs per token, ``torch.cuda.max_memory_allocated``), so what btune reports can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import btune

#: Dense bf16 peak FLOP/s of the GPUs this script knows (the datasheets' figures, as btune's table has them).
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps before the measured window")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--eval-every", type=int, default=0, help="an eval pass every N steps (0: none)")
    ap.add_argument("--out", help="write this script's own measurements as JSON")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 128, 1),
                         num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    # Training FLOPs per token: 6 per weight (forward and backward) plus causal attention's
    # 6 * layers * seq * hidden (QK^T and AV, forward and backward, half the square).
    flops_per_token = 6 * n_params + 6 * args.layers * args.seq * args.hidden
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    btune.meta(model=f"llama-{args.layers}x{args.hidden}", n_params=n_params, flops_per_token=flops_per_token,
               precision="bf16" if dtype == torch.bfloat16 else "fp32", device_name=name)

    tokens = args.batch * args.seq
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    window_start, eval_s = None, 0.0
    for i in range(args.steps):
        logits = model(data[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # synchronises: the step has ended on the device
        btune.step(tokens=tokens, loss=value, warmup=i < args.warmup)
        if i == args.warmup - 1:
            window_start = time.perf_counter()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        if args.eval_every and (i + 1) % args.eval_every == 0 and i + 1 < args.steps:
            t0 = time.perf_counter()
            with btune.phase("eval"), torch.no_grad():  # not charged to the next step, by btune or here
                model(data[:, :-1])
                if device == "cuda":
                    torch.cuda.synchronize()
            eval_s += time.perf_counter() - t0 if window_start is not None else 0.0
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - (window_start or time.perf_counter()) - eval_s
    measured = args.steps - args.warmup
    tok_s = measured * tokens / elapsed if elapsed > 0 else None
    peak = PEAK_BF16.get(name)
    own = {"tokens_per_s": tok_s, "steps_measured": measured, "tokens_per_step": tokens, "n_params": n_params,
           "flops_per_token": flops_per_token, "device_name": name,
           "mfu": flops_per_token * tok_s / peak if tok_s and peak else None,
           "max_memory_allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None,
           "btune": btune.enabled()}
    print(f"own measurement: {tok_s:,.0f} tok/s over {measured} steps, MFU {own['mfu']}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(own, fh)


if __name__ == "__main__":
    main()
