"""Dense decoder workload: train (forward, backward, AdamW), prefill or decode on synthetic tokens (training: or a
token file's, ``--data FILE``), with a preset's random weights or a Hugging Face checkpoint's (``--checkpoint DIR``;
``--save-checkpoint DIR`` after training; ``--rope-theta`` overrides the model's RoPE base).

Run alone: ``python -m workloads.dense --preset tiny --steps 20`` (events as JSON lines on stdout).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from workloads.dry_run import print_plan
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import bytes_moved, flops_per_token, memory_estimate, param_counts, sharded
from workloads.options import run_main
from workloads.specs.dense import (
    CHECKPOINT_RUN_DEFAULTS,
    DENSE,
    PRESET_RUN_DEFAULTS,
    apply_overrides,
    model_overrides,
)
from workloads.tokens import resolve_format, sha256_file, train_ids

if TYPE_CHECKING:  # the module stays torch-free until a run starts (the plan, --dry-run, option errors)
    from workloads.harness import Harness, Steps

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: model config, shapes, parameter counts, FLOPs per token, memory estimate.

    Allocates nothing (``--dry-run`` prints it); torch-free but with ``--checkpoint``, whose config and tensor
    headers are checked here (ValueError, one line: a bad checkpoint, a shape knob that contradicts it, a token
    file the model cannot train on). The model knobs (``--rope-theta``) are applied to the config here.
    """
    mode = opts["mode"]
    checkpoint = None
    if opts.get("checkpoint"):
        from workloads import checkpoint as ck

        cfg, checkpoint = ck.read_dense(opts["checkpoint"], opts["layers"], "dense (run moe for Mixtral)")
        run_defaults = {**CHECKPOINT_RUN_DEFAULTS,
                        "seq_len": min(CHECKPOINT_RUN_DEFAULTS["seq_len"], cfg.max_seq_len - (mode == "decode"))}
    else:
        run_defaults = PRESET_RUN_DEFAULTS[opts["preset"]]
        cfg = PRESETS[opts["preset"]]
        if opts["layers"]:
            cfg = cfg.with_layers(opts["layers"])
    batch = opts["batch_size"] or run_defaults["batch_size"]
    seq = opts["seq_len"] or run_defaults["seq_len"]
    needed = seq + 1  # train reads seq + 1 tokens; decode writes one position past the context
    if checkpoint is not None and seq + (mode == "decode") > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq}: the checkpoint's context is {cfg.max_seq_len} positions"
                         + (" (decode writes one past the context)" if mode == "decode" else ""))
    if needed > cfg.max_seq_len and checkpoint is None:
        cfg = replace(cfg, max_seq_len=needed)
    cfg = apply_overrides(cfg, opts)
    data = None
    if opts.get("data") and mode == "train":
        ids = train_ids(opts["data"], opts["data_format"], opts["data_dtype"], vocab=cfg.vocab_size, need=seq + 1)
        data = {"path": str(opts["data"]), "format": resolve_format(opts["data"], opts["data_format"]),
                "sha256": sha256_file(opts["data"]), "tokens": len(ids)}
    if opts.get("save_checkpoint"):
        _check_save(opts, cfg, checkpoint)
    steps = opts["steps"] or (0 if opts["duration"] else run_defaults["steps"])
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    shard, dp = int(opts.get("dp_shard") or 1), int(opts.get("dp_shard") or 1) * int(opts.get("dp_replicate") or 1)
    cp = int(opts.get("cp") or 1)
    estimate = memory_estimate(cfg, batch, seq, mode, _DTYPE_BYTES[dtype],
                               activation_checkpointing=opts["activation_checkpointing"],
                               compiled=opts.get("compile_mode", "none") != "none",
                               fp8=opts.get("fp8_mode", "off") != "off", tp=int(opts.get("tp") or 1), cp=cp,
                               cp_attention=str(opts.get("cp_attention") or "gather"))
    block = (param_counts(cfg)["matmul"] - cfg.d_model * cfg.vocab_size) // cfg.n_layers * _DTYPE_BYTES[dtype]
    estimate = sharded(estimate, shard * cp, block)  # per rank under FSDP (over --dp-shard x --cp)
    return {
        "model": asdict(cfg),
        "mode": mode,
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "duration": opts["duration"],
        "warmup": opts["warmup"],
        "dtype": dtype,
        "tokens_per_step": batch * (seq if mode != "decode" else 1) * dp,  # --batch-size is per data-parallel rank
        "dp": {"shard": shard, "replicate": dp // shard} if dp > 1 else None,
        "cp": cp if cp > 1 else None,
        "params": param_counts(cfg),
        "flops_per_token": flops_per_token(cfg, seq, mode),
        "memory_estimate_bytes": estimate,  # per rank
        # decode moves the weights once a step and reads every sequence's seq + 1 cached positions (MBU)
        "moved": ({**bytes_moved(cfg, _DTYPE_BYTES[dtype]), "kv_tokens_per_step": batch * (seq + 1)}
                  if mode == "decode" else None),
        **({"checkpoint": checkpoint} if checkpoint else {}),
        **({"data": data} if data else {}),
    }


def _check_save(opts: dict[str, Any], cfg: ModelConfig, checkpoint: dict[str, Any] | None) -> None:
    """--save-checkpoint: a new (or empty) directory, one process, a config a Hugging Face family can hold."""
    from workloads import checkpoint as ck

    out = opts["save_checkpoint"]
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--save-checkpoint {out}: exists and is not an empty directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--save-checkpoint {out}: {parent} is not writable")
    if opts["tp"] > 1 or int(opts.get("dp_shard") or 1) * int(opts.get("dp_replicate") or 1) > 1:
        raise ValueError("--save-checkpoint with --tp > 1, --dp-shard > 1 or --dp-replicate > 1 is not supported "
                         "yet (the weights are sharded)")
    model_type = checkpoint["model_type"] if checkpoint else ck.infer_model_type(cfg)
    ck.FAMILIES[model_type].to_hf(cfg)  # CheckpointError when the family cannot hold this config


def setup(h: Harness, p: dict[str, Any]) -> Steps:
    """The model for plan ``p`` (workloads.build) and the step function of its mode: train, prefill or decode."""
    import torch

    from workloads import parallel
    from workloads.build import build
    from workloads.harness import Steps
    from workloads.models.kv_cache import KVCache
    end: Callable[[], dict[str, Any]] | None = None
    from workloads.models.transformer import Transformer

    opts, cfg, mode, tp = h.opts, ModelConfig(**p["model"]), p["mode"], int(h.opts["tp"])
    meta: dict[str, Any] = {}
    make: Any = lambda kernel: Transformer(cfg, attention=kernel)  # noqa: E731
    if p.get("checkpoint"):
        from workloads import checkpoint as ck

        opts, load = ck.loader(h, opts, cfg.sliding_window, model_overrides(opts), into=meta)

        def make(kernel: Any) -> Any:
            return load(kernel).train(mode == "train")

    b = build(make, opts, h.device, h.dtype,
              heads=(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), seq_len=p["seq_len"] if mode != "decode" else 1,
              training=mode == "train", mesh=h.mesh, dp_mesh=h.dp_mesh, cp_mesh=h.cp_mesh)
    model, fwd, autocast, no_backward = b.model, b.forward, b.autocast, b.no_backward
    batch, seq = p["batch_size"], p["seq_len"]
    # each data-parallel rank reads its own batches (TP ranks of one replica the same ones)
    seed = opts["seed"] + 7919 * h.data_rank
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(h.device) for _ in range(4)]
    if p.get("data"):
        from workloads.tokens import train_batch

        ids = train_ids(opts["data"], opts["data_format"], opts["data_dtype"], vocab=cfg.vocab_size, need=seq + 1)

        def batch_of(i: int) -> torch.Tensor:  # batch i of the file: the same for the same --seed
            return torch.from_numpy(train_batch(ids, seq + 1, batch, seed, i)).to(h.device, non_blocking=True)
    else:

        def batch_of(i: int) -> torch.Tensor:
            return pool[i % len(pool)]

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
            data = batch_of(i)
            with autocast(), parallel.loss_context(tp):  # under --cp: this rank's chunks of each sequence
                loss = train_fwd(parallel.cp_slice(data[:, :-1], h.cp_mesh), parallel.cp_slice(data[:, 1:], h.cp_mesh))
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        if opts["save_checkpoint"]:
            end = _saver(h, model, cfg, opts["save_checkpoint"], (p.get("checkpoint") or {}).get("model_type"))
    elif mode == "prefill":

        def step(i: int) -> None:
            with no_backward(), autocast():
                fwd(pool[i % len(pool)][:, :-1])
    else:
        # this rank's heads: the width shrinks with them, so head_dim stays the model's
        cache_cfg = replace(cfg, d_model=cfg.d_model // tp, n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp)
        cache = KVCache(cache_cfg, batch, seq + 1, device=h.device, dtype=h.dtype)
        with no_backward(), autocast():
            model(pool[0][:, :seq], cache=cache, positions=0)  # fill the context once, untimed
        nxt = pool[1][:, :1].clone()

        def step(i: int) -> None:  # greedy: each step's token feeds the next
            with no_backward(), autocast():
                logits = fwd(nxt, cache=cache, positions=seq)
                nxt.copy_(parallel.full(logits[:, -1]).argmax(-1, keepdim=True))  # TP: the vocab-sharded logits

    return Steps(step, p["tokens_per_step"], b.ran,
                 meta={"flops_per_token": p["flops_per_token"], "params": p["params"], **(p["moved"] or {}), **meta},
                 end=end)


def _saver(h: Harness, model: Any, cfg: ModelConfig, out: str, model_type: str | None) -> Callable[[], dict]:
    """The end of a --save-checkpoint run: rank 0 writes the weights; the summary's ``saved_checkpoint``."""
    def end() -> dict[str, Any]:
        from workloads import checkpoint as ck

        if h.rank != 0:
            return {}
        t0 = time.perf_counter()
        ck.save(model, cfg, out, model_type)
        _, info = ck.inspect(out)
        return {"saved_checkpoint": {**info.record(), "save_s": round(time.perf_counter() - t0, 3)}}

    return end


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return print_plan(opts, plan)
    from workloads.harness import Harness

    return Harness("dense", opts).run(plan, setup)


def main(argv: list[str] | None = None) -> int:
    return run_main(DENSE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
