"""Dense decoder workload: train (forward, backward, AdamW), prefill or decode on synthetic tokens.

Run alone: ``python -m workloads.dense --preset tiny --steps 20`` (events as JSON lines on stdout).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import Any

from workloads.dry_run import print_plan
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import bytes_moved, flops_per_token, memory_estimate, param_counts
from workloads.options import run_main
from workloads.protocol import Emitter
from workloads.specs.dense import DENSE, PRESET_RUN_DEFAULTS

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


def _build(opts: dict[str, Any], p: dict[str, Any], device: Any, dtype: Any,
           mesh: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """The model on ``device`` with the attention kernel, FP8, TP and compile applied; and what actually ran."""
    import torch

    from workloads import parallel
    from workloads.models import fp8
    from workloads.models.attention import make_kernel
    from workloads.models.transformer import Transformer

    cfg = ModelConfig(**p["model"])
    kernel, attn_reason = make_kernel(
        opts["attention_backend"], device, dtype, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, seq_len=p["seq_len"] if p["mode"] != "decode" else 1,
        window=opts["attention_window"] or None, training=p["mode"] == "train",
    )
    recipe = None if opts["fp8_recipe"] == "auto" else opts["fp8_recipe"]
    fp8_choice = fp8.resolve(opts["fp8_mode"], recipe, device)
    with torch.device(device):
        model = Transformer(cfg, attention=kernel, activation_checkpointing=opts["activation_checkpointing"])
    model = model.to(dtype=dtype)
    if mesh is not None:
        if fp8_choice.library != "off":
            raise ValueError("--fp8-mode with --tp > 1 is not supported yet; use one or the other")
        parallel.check_divisible(cfg.n_heads, cfg.n_kv_heads, mesh.size())
        parallel.apply_tp(model, mesh)
    autocast = fp8.apply(model, fp8_choice, head=opts["fp8_head"])
    if p["mode"] != "train":
        model.eval()
    fwd = model if opts["compile_mode"] == "none" else torch.compile(model, mode=opts["compile_mode"])
    ran = {
        "attention": {"requested": opts["attention_backend"], "reason": attn_reason, "window": kernel.window},
        "fp8": {"requested": opts["fp8_mode"], "library": fp8_choice.library, "recipe": fp8_choice.recipe,
                "reason": fp8_choice.reason, "lm_head": bool(opts["fp8_head"]) and fp8_choice.library != "off"},
        "compile": opts["compile_mode"],
        "activation_checkpointing": opts["activation_checkpointing"],
        "tp": mesh.size() if mesh is not None else 1,
    }
    return model, (fwd, autocast), ran


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return print_plan(opts, plan)

    import torch

    from workloads import parallel
    from workloads.loop import (
        LoopSpec,
        SetupError,
        device_name,
        device_uuid,
        finish,
        resolve_device,
        resolve_dtype,
        run_steps,
        setup_failed,
    )
    from workloads.models.kv_cache import KVCache

    em = Emitter()
    tp = parallel.world_size()
    mesh = None
    try:
        mesh = parallel.join(opts["tp"], opts["device"])
        device = resolve_device(opts["device"])
        p = plan(opts, device.type)
        dtype = resolve_dtype(p["dtype"], device)
        torch.manual_seed(opts["seed"])
        model, (fwd, autocast), ran = _build(opts, p, device, dtype, mesh)
    except (SetupError, ValueError, torch.OutOfMemoryError) as exc:
        return setup_failed(em, exc)

    cfg, mode = model.cfg, p["mode"]
    batch, seq = p["batch_size"], p["seq_len"]
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    pool = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]

    if mode == "train":
        opt = torch.optim.AdamW(parallel.param_groups(model), lr=opts["lr"], fused=device.type == "cuda")

        def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = model(tokens)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        # Compiled, the loss is compiled with the model so the fp32 upcast fuses into the cross-entropy;
        # under TP the logits are vocabulary-sharded and the loss runs under loss_parallel, outside compile.
        if tp > 1 or opts["compile_mode"] == "none":
            train_fwd = loss_of if tp == 1 else (lambda x, y: torch.nn.functional.cross_entropy(
                fwd(x).flatten(0, 1).float(), y.flatten()))
        else:
            train_fwd = torch.compile(loss_of, mode=opts["compile_mode"])
        def loss_ctx() -> Any:
            return parallel.loss_context(tp)

        def step(i: int) -> torch.Tensor:
            data = pool[i % len(pool)]
            with autocast(), loss_ctx():
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
        cache = KVCache(cache_cfg, batch, seq + 1, device=device, dtype=dtype)
        with torch.inference_mode(), autocast():
            model(pool[0][:, :seq], kv_cache=cache, start_pos=0)  # fill the context once, untimed
        nxt = pool[1][:, :1].clone()

        def step(i: int) -> None:  # greedy: each step's token feeds the next
            with torch.inference_mode(), autocast():
                logits = fwd(nxt, kv_cache=cache, start_pos=seq)
                nxt.copy_(parallel.full(logits[:, -1]).argmax(-1, keepdim=True))  # TP: the vocab-sharded logits

    precision = "fp8" if ran["fp8"]["library"] != "off" else p["dtype"]
    # every rank: each names its GPU, whose energy the summary counts (design.md, "Energy")
    em.meta(workload="dense", options=opts, plan=p, device=str(device), device_name=device_name(device),
        n_devices=tp, precision=precision, flops_per_token=p["flops_per_token"], params=p["params"],
        torch_version=torch.__version__, backends=ran, device_uuid=device_uuid(device), **(p["moved"] or {}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        res = run_steps(em, device, LoopSpec(opts["warmup"], p["steps"], opts["duration"]), step, p["tokens_per_step"])
    except torch.OutOfMemoryError as exc:
        em.error(f"out of memory: {str(exc).splitlines()[0]}", kind="oom")
        print(f"error: CUDA out of memory: {exc}", file=sys.stderr)
        return 3
    return finish(em, device, opts, p, res)


def main(argv: list[str] | None = None) -> int:
    return run_main(DENSE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
