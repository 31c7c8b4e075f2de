"""Dense decoder workload: train (forward, backward, AdamW), prefill or decode on synthetic tokens.

Run alone: ``python -m workloads.dense --preset tiny --steps 20`` (events as JSON lines on stdout).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from workloads.dry_run import print_plan
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import bytes_moved, flops_per_token, memory_estimate, param_counts
from workloads.options import run_main
from workloads.specs.dense import DENSE, PRESET_RUN_DEFAULTS

if TYPE_CHECKING:  # the module stays torch-free until a run starts (the plan, --dry-run, option errors)
    from workloads.harness import Harness, Steps

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: model config, shapes, parameter counts, FLOPs per token, memory estimate.

    Torch-free, allocates nothing (``--dry-run`` prints it).
    """
    preset = opts["preset"]
    run_defaults = PRESET_RUN_DEFAULTS[preset]
    cfg: ModelConfig = PRESETS[preset]
    if opts["layers"]:
        cfg = cfg.with_layers(opts["layers"])
    batch = opts["batch_size"] or run_defaults["batch_size"]
    seq = opts["seq_len"] or run_defaults["seq_len"]
    mode = opts["mode"]
    needed = seq + 1  # train reads seq + 1 tokens; decode writes one position past the context
    if needed > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=needed)
    steps = opts["steps"] or (0 if opts["duration"] else run_defaults["steps"])
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    return {
        "model": asdict(cfg),
        "mode": mode,
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "duration": opts["duration"],
        "warmup": opts["warmup"],
        "dtype": dtype,
        "tokens_per_step": batch * (seq if mode != "decode" else 1),
        "params": param_counts(cfg),
        "flops_per_token": flops_per_token(cfg, seq, mode),
        "memory_estimate_bytes": memory_estimate(cfg, batch, seq, mode, _DTYPE_BYTES[dtype],
                                                 activation_checkpointing=opts["activation_checkpointing"]),
        # decode moves the weights once a step and reads every sequence's seq + 1 cached positions (MBU)
        "moved": ({**bytes_moved(cfg, _DTYPE_BYTES[dtype]), "kv_tokens_per_step": batch * (seq + 1)}
                  if mode == "decode" else None),
    }


def setup(h: Harness, p: dict[str, Any]) -> Steps:
    """The model for plan ``p`` (workloads.build) and the step function of its mode: train, prefill or decode."""
    import torch

    from workloads import parallel
    from workloads.build import build
    from workloads.harness import Steps
    from workloads.models.kv_cache import KVCache
    from workloads.models.transformer import Transformer

    opts, cfg, mode, tp = h.opts, ModelConfig(**p["model"]), p["mode"], h.world
    b = build(lambda kernel: Transformer(cfg, attention=kernel), opts, h.device, h.dtype,
              heads=(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), seq_len=p["seq_len"] if mode != "decode" else 1,
              training=mode == "train", mesh=h.mesh)
    model, fwd, autocast = b.model, b.forward, b.autocast
    batch, seq = p["batch_size"], p["seq_len"]
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    pool = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(h.device) for _ in range(4)]

    if mode == "train":
        opt = torch.optim.AdamW(parallel.param_groups(model), lr=opts["lr"], fused=h.device.type == "cuda")

        def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = model(tokens)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        # Compiled, the loss is compiled with the model so the fp32 upcast fuses into the cross-entropy;
        # under TP the logits are vocabulary-sharded and the loss runs under loss_parallel, outside compile.
        if tp > 1 or opts["compile_mode"] == "none":
            train_fwd = loss_of if tp == 1 else (lambda x, y: torch.nn.functional.cross_entropy(
                fwd(x).flatten(0, 1).float(), y.flatten()))
        else:
            train_fwd = b.compile(loss_of)

        def step(i: int) -> torch.Tensor:
            data = pool[i % len(pool)]
            with autocast(), parallel.loss_context(tp):
                loss = train_fwd(data[:, :-1], data[:, 1:])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    elif mode == "prefill":

        def step(i: int) -> None:
            with torch.inference_mode(), autocast():
                fwd(pool[i % len(pool)][:, :-1])
    else:
        # this rank's heads: the width shrinks with them, so head_dim stays the model's
        cache_cfg = replace(cfg, d_model=cfg.d_model // tp, n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp)
        cache = KVCache(cache_cfg, batch, seq + 1, device=h.device, dtype=h.dtype)
        with torch.inference_mode(), autocast():
            model(pool[0][:, :seq], kv_cache=cache, start_pos=0)  # fill the context once, untimed
        nxt = pool[1][:, :1].clone()

        def step(i: int) -> None:  # greedy: each step's token feeds the next
            with torch.inference_mode(), autocast():
                logits = fwd(nxt, kv_cache=cache, start_pos=seq)
                nxt.copy_(parallel.full(logits[:, -1]).argmax(-1, keepdim=True))  # TP: the vocab-sharded logits

    return Steps(step, p["tokens_per_step"], b.ran,
                 meta={"flops_per_token": p["flops_per_token"], "params": p["params"], **(p["moved"] or {})})


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return print_plan(opts, plan)
    from workloads.harness import Harness

    return Harness("dense", opts).run(plan, setup)


def main(argv: list[str] | None = None) -> int:
    return run_main(DENSE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
