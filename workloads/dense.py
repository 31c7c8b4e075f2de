"""Dense decoder workload: train (forward, backward, AdamW), prefill or decode on synthetic tokens.

Run alone: ``python -m workloads.dense --preset tiny --steps 20`` (events as JSON lines on stdout).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from typing import Any

from tuner.protocol import Emitter
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import flops_per_token, memory_estimate, param_counts
from workloads.options import run_main
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
    needed = seq + (1 if mode == "train" else 0) + (1 if mode == "decode" else 0)
    if needed > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=needed)
    steps = opts["steps"] or (0 if opts["duration"] else run_defaults["steps"])
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    tokens_per_step = batch * (seq if mode != "decode" else 1)
    return {
        "model": asdict(cfg),
        "mode": mode,
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "duration": opts["duration"],
        "warmup": opts["warmup"],
        "dtype": dtype,
        "tokens_per_step": tokens_per_step,
        "params": param_counts(cfg),
        "flops_per_token": flops_per_token(cfg, seq, mode),
        "memory_estimate_bytes": memory_estimate(cfg, batch, seq, mode, _DTYPE_BYTES[dtype]),
    }


def _dry_run(opts: dict[str, Any]) -> int:
    device_type = opts["device"]
    if device_type == "auto":
        try:
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device_type = "cpu"
    print(json.dumps(plan(opts, device_type), indent=2))
    return 0


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return _dry_run(opts)

    import torch

    from workloads.loop import (
        LoopSpec,
        SetupError,
        device_name,
        resolve_device,
        resolve_dtype,
        run_steps,
    )
    from workloads.models.transformer import Transformer

    em = Emitter()
    try:
        device = resolve_device(opts["device"])
        p = plan(opts, device.type)
        dtype = resolve_dtype(p["dtype"], device)
        if opts["attention_backend"] not in ("auto", "math"):
            raise SetupError(f"--attention-backend {opts['attention_backend']}: not available yet in this build")
        if opts["mode"] == "decode":
            raise SetupError("--mode decode: not available yet in this build")
    except SetupError as exc:
        em.error(str(exc), kind="config")
        print(f"error: {exc}", file=sys.stderr)
        return 2

    torch.manual_seed(opts["seed"])
    cfg = ModelConfig(**p["model"])
    model = Transformer(cfg).to(device=device, dtype=dtype)
    mode = p["mode"]
    if mode != "train":
        model.eval()
    fwd = model if opts["compile_mode"] == "none" else torch.compile(model, mode=opts["compile_mode"])
    batch, seq = p["batch_size"], p["seq_len"]
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    pool = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]

    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"], fused=device.type == "cuda")

        def step(i: int) -> torch.Tensor:
            data = pool[i % len(pool)]
            logits = fwd(data[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), data[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:

        def step(i: int) -> torch.Tensor:
            with torch.inference_mode():
                logits = fwd(pool[i % len(pool)][:, :-1])
                return logits[:, -1].float().sum()

    em.meta(
        workload="dense",
        options=opts,
        plan=p,
        device=str(device),
        device_name=device_name(device),
        n_devices=1,
        precision=p["dtype"],
        flops_per_token=p["flops_per_token"],
        params=p["params"],
        torch_version=torch.__version__,
        backends={"attention": "sdpa-auto" if opts["attention_backend"] == "auto" else opts["attention_backend"],
                  "compile": opts["compile_mode"], "fp8": "off"},
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        res = run_steps(em, device, LoopSpec(opts["warmup"], p["steps"], opts["duration"]), step, p["tokens_per_step"])
    except torch.OutOfMemoryError as exc:
        em.error(f"out of memory: {str(exc).splitlines()[0]}", kind="oom")
        print(f"error: CUDA out of memory: {exc}", file=sys.stderr)
        return 3
    em.summary(
        first_step_ms=res["first_step_ms"],
        compile_s=res["first_step_ms"] / 1000.0 if opts["compile_mode"] != "none" and res["first_step_ms"] else None,
        memory_estimate_bytes=p["memory_estimate_bytes"],
        steps_run=res["steps"],
        interrupted=res["interrupted"],
    )
    em.close()
    return 130 if res["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(DENSE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
