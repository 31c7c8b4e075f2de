"""MoE decoder workload: train (forward, backward, AdamW) or prefill on synthetic tokens, with expert balancing
and expert-balance metrics; a preset's random weights or a Mixtral checkpoint's (``--checkpoint DIR``).

Run alone: ``python -m workloads.moe --preset tiny --steps 20`` (events as JSON lines on stdout).
Step events carry step_ms, tokens and the cross-entropy loss; ``experts`` events (one per
``--balance-window`` steps) carry per-layer expert counts, drops, router entropy and balance loss; the
console computes the balance figures (tuner.balance).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from workloads.dry_run import print_plan
from workloads.models.config import ModelConfig
from workloads.models.flops import sharded
from workloads.models.moe_config import MoEConfig, resolve
from workloads.models.moe_flops import moe_flops_per_token, moe_memory_estimate, moe_param_counts
from workloads.options import run_main
from workloads.specs.moe import (
    CHECKPOINT_RUN_DEFAULTS,
    MOE,
    MOE_MODEL_TYPES,
    PRESET_RUN_DEFAULTS,
    checkpoint_contradictions,
)

if TYPE_CHECKING:  # the module stays torch-free until a run starts (the plan, --dry-run, option errors)
    from workloads.build import Built
    from workloads.harness import Harness, Steps

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: MoE config, shapes, balancing, active parameters, FLOPs per token, memory estimate.

    Allocates nothing (``--dry-run`` prints it); torch-free but with ``--checkpoint``, whose config and tensor
    headers are checked here. ValueError (one line) for an inconsistent shape, a bad checkpoint or a shape knob
    that contradicts it.
    """
    mode = opts["mode"]
    checkpoint = None
    if opts.get("checkpoint"):
        cfg, checkpoint = _checkpoint_config(opts)
        run_defaults = {**CHECKPOINT_RUN_DEFAULTS,
                        "seq_len": min(CHECKPOINT_RUN_DEFAULTS["seq_len"], cfg.base.max_seq_len)}
    else:
        run_defaults = PRESET_RUN_DEFAULTS[opts["preset"]]
        cfg = resolve(opts)
    batch = opts["batch_size"] or run_defaults["batch_size"]
    seq = opts["seq_len"] or run_defaults["seq_len"]
    if seq + 1 > cfg.base.max_seq_len and checkpoint is None:
        cfg = replace(cfg, base=replace(cfg.base, max_seq_len=seq + 1))
    steps = opts["steps"] or (0 if opts["duration"] else run_defaults["steps"])
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    shard, cp = int(opts.get("dp_shard") or 1), int(opts.get("cp") or 1)
    dp = shard * int(opts.get("dp_replicate") or 1)
    balance = opts["balance"]
    if balance == "auto":
        balance = run_defaults["balance"] if mode == "train" else "none"
    aux_on, free_on = balance in ("aux-loss", "both"), balance in ("aux-free", "both")
    rate = opts["bias_update_rate"] if opts["bias_update_rate"] is not None else run_defaults["bias_update_rate"]
    return {
        "model": asdict(cfg),
        "moe_layer_ids": list(cfg.moe_layer_ids),
        "mode": mode,
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "duration": opts["duration"],
        "warmup": opts["warmup"],
        "dtype": dtype,
        "tokens_per_step": batch * seq * dp,  # --batch-size is per data-parallel rank
        "capacity_per_expert": cfg.capacity(batch * seq),
        "expert_impl": "grouped" if opts["expert_impl"] == "auto" else opts["expert_impl"],
        "balance": {"mode": balance, "aux_loss_coef": opts["aux_loss_coef"] if aux_on else None,
                    "bias_update_rate": rate if free_on else None, "metrics": opts["balance_metrics"],
                    "window": opts["balance_window"]},
        "data": {"kind": opts["data"], "zipf_exponent": opts["zipf_exponent"] if opts["data"] == "zipf" else None},
        "params": moe_param_counts(cfg),
        "flops_per_token": moe_flops_per_token(cfg, seq, mode),
        "memory_estimate_bytes": sharded(moe_memory_estimate(
            cfg, batch, seq, mode, _DTYPE_BYTES[dtype], activation_checkpointing=opts["activation_checkpointing"],
            compiled=opts.get("compile_mode", "none") != "none", fp8=opts.get("fp8_mode", "off") != "off",
            tp=int(opts.get("tp") or 1), cp=cp, cp_attention=str(opts.get("cp_attention") or "gather")), shard * cp,
            _block_bytes(cfg, _DTYPE_BYTES[dtype], int(opts.get("ep") or 1))),  # per rank
        "dp": {"shard": shard, "replicate": dp // shard} if dp > 1 else None,
        "cp": cp if cp > 1 else None,
        **({"checkpoint": checkpoint} if checkpoint else {}),
    }


def _block_bytes(cfg: MoEConfig, dtype_bytes: int, ep: int = 1) -> int:
    """One block's parameters as FSDP gathers them (the largest: an MoE block's, every expert's weights; under
    expert parallelism the routed experts stay on their ranks, never gathered), in bytes."""
    counts = moe_param_counts(cfg)
    gathered = counts["total"] - counts["embedding"] - (counts["routed_experts"] if ep > 1 else 0)
    return gathered // max(cfg.base.n_layers, 1) * dtype_bytes


def _checkpoint_config(opts: dict[str, Any]) -> tuple[MoEConfig, dict[str, Any]]:
    """The MoE config of ``--checkpoint`` after its checks (``--capacity-factor`` applied), and the record's block;
    ValueError naming the first shape knob that contradicts the checkpoint."""
    from workloads import checkpoint as ck

    path = opts["checkpoint"]
    cfg, info = ck.read(path)
    if info.model_type not in MOE_MODEL_TYPES or not isinstance(cfg, MoEConfig):
        raise ValueError(f"--checkpoint {path}: a {info.model_type} checkpoint is a dense model; run it with the "
                         "dense workload")
    bad = checkpoint_contradictions(opts, cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.base.max_seq_len)
    if bad:
        raise ValueError(bad[0][1])
    if opts.get("capacity_factor") is not None:
        cfg = replace(cfg, capacity_factor=opts["capacity_factor"]).validate()
    return cfg, info.record()


def config_of(p: dict[str, Any]) -> MoEConfig:
    """The MoEConfig a plan describes."""
    m = dict(p["model"])
    return MoEConfig(base=ModelConfig(**m.pop("base")), **m)


def _model(h: Harness, p: dict[str, Any]) -> tuple[Built, dict[str, Any]]:
    """The MoE model for plan ``p`` through workloads.build, with its expert GEMM (random weights, or loaded from
    the plan's checkpoint); what ran, and the meta fields of a checkpoint (its block, with the load time)."""
    from workloads.build import build
    from workloads.models.moe import MoETransformer
    from workloads.models.moe_experts import grouped_gemm_backend

    opts, cfg, impl = h.opts, config_of(p), p["expert_impl"]
    if impl == "grouped":
        gemm, gemm_reason = grouped_gemm_backend(h.device, h.dtype, cfg.base.d_model, cfg.expert_d_ff)
    else:
        gemm, gemm_reason = "none", "loop: one torch.where and two matmuls per expert (a host sync per expert on GPU)"
    gemm_used = "bmm" if gemm == "none" else gemm
    meta: dict[str, Any] = {}
    make: Any = lambda kernel: MoETransformer(cfg, kernel, impl, gemm_used)  # noqa: E731
    if p.get("checkpoint"):
        from workloads import checkpoint as ck

        opts, load = ck.loader(h, opts, cfg.base.sliding_window, into=meta)

        def make(kernel: Any) -> Any:
            model = load(kernel)
            model.set_experts(impl, gemm_used)
            model.set_capacity(cfg.capacity_factor)
            return model.train(p["mode"] == "train")

    ep_group = ep_replicas = None
    if int(opts.get("ep") or 1) > 1:  # experts over one replica's shard ranks, the same in every replica
        from workloads import parallel

        ep_group, ep_replicas = parallel.ep_groups(h.dp_mesh)
    b = build(make, opts, h.device, h.dtype, heads=(cfg.base.n_heads, cfg.base.n_kv_heads, cfg.base.head_dim),
              seq_len=p["seq_len"], training=p["mode"] == "train", mesh=h.mesh, dp_mesh=h.dp_mesh,
              ep_group=ep_group, ep_replicas=ep_replicas, cp_mesh=h.cp_mesh)
    if b.fp8.library != "off":
        b.ran["fp8"]["reason"] += f"; routed experts and the router stay in {p['dtype']}"
    b.ran.update({
        "experts": {"requested": opts["expert_impl"], "impl": impl, "gemm": gemm, "reason": gemm_reason},
        "router": cfg.router,
        "balance": p["balance"]["mode"],
        "parallel": "; ".join(part for part, on in (
            ("TP inside the routed experts (router replicated), dense plan for attention and shared experts",
             h.mesh is not None),
            ("expert parallel: routed experts split over the --dp-shard x --cp ranks, all-to-all dispatch and "
             "combine" + (", the same experts in every replica" if ep_replicas is not None else ""),
             ep_group is not None)) if on) or None,
    })
    return b, meta


def make_pool(kind: str, exponent: float, vocab: int, batch: int, seq: int, seed: int, n: int = 8) -> list[Any]:
    """``n`` batches of [batch, seq + 1] tokens: uniform, or zipf (frequency ∝ 1/rank^s over a seeded
    permutation of the vocabulary), on the CPU."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "uniform":
        return [torch.randint(0, vocab, (batch, seq + 1), generator=gen) for _ in range(n)]
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    ids = torch.randperm(vocab, generator=gen)
    out = []
    for _ in range(n):
        ranks = torch.multinomial(weights, batch * (seq + 1), replacement=True, generator=gen)
        out.append(ids[ranks].view(batch, seq + 1))
    return out


def setup(h: Harness, p: dict[str, Any]) -> Steps:
    """The model for plan ``p``, the balance tracker and the step function of its mode: train or prefill."""
    import torch

    from workloads import parallel
    from workloads.harness import Steps
    from workloads.models.moe_stats import BalanceWindow

    opts, tp, device = h.opts, int(h.opts["tp"]), h.device
    b, meta = _model(h, p)
    model, fwd, autocast, cfg = b.model, b.forward, b.autocast, b.model.moe_cfg
    no_backward = b.no_backward
    mode, batch, seq, bal = p["mode"], p["batch_size"], p["seq_len"], p["balance"]
    aux_on, free_on = bal["aux_loss_coef"] is not None, bal["bias_update_rate"] is not None
    metrics_on = bal["metrics"] == "on"
    model.set_collect(stats=metrics_on, aux=aux_on)
    layers = model.moe_layers
    tracker = (BalanceWindow(h.em.experts, len(layers), cfg.n_experts, bal["window"], device, p["moe_layer_ids"],
                             cfg.top_k, p["capacity_per_expert"]) if metrics_on and h.rank == 0 else None)
    pool = [t.to(device) for t in make_pool(p["data"]["kind"], opts["zipf_exponent"], cfg.base.vocab_size,
                                            batch, seq, opts["seed"] + 7919 * h.data_rank)]

    if mode == "train":
        opt = torch.optim.AdamW(parallel.param_groups(model), lr=opts["lr"], fused=device.type == "cuda")
        coef, rate = bal["aux_loss_coef"], bal["bias_update_rate"]

        def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = model(tokens)
            ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
            return (ce + coef * out.aux_loss if aux_on else ce), ce, out.stats

        # Under TP the logits are vocabulary-sharded: the loss runs under loss_parallel, outside compile.
        train_fwd = b.compile(loss_of) if tp == 1 else loss_of
        if tp > 1 and opts["compile_mode"] != "none":
            model.forward = b.compile(model.forward)  # type: ignore[method-assign]

        def step(i: int) -> torch.Tensor:
            data = pool[i % len(pool)]
            with autocast(), parallel.loss_context(tp):
                total, ce, stats = train_fwd(parallel.cp_slice(data[:, :-1], h.cp_mesh),
                                             parallel.cp_slice(data[:, 1:], h.cp_mesh))
                total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if free_on:
                counts = stats[:, : cfg.n_experts].detach().clone()
                if h.dp_mesh is not None:  # every replica moves its biases by the global batch's loads (the rule
                    torch.distributed.all_reduce(counts)  # takes their sign only: TP ranks' copies do no harm)
                for layer, row in zip(layers, counts, strict=True):
                    layer.router.update_bias(row, rate)
            if tracker is not None:
                tracker.add(i, stats)
            return parallel.full(ce.detach()).clone()
    else:

        def step(i: int) -> None:
            with no_backward(), autocast():
                out = fwd(pool[i % len(pool)][:, :-1])
                if tracker is not None:
                    tracker.add(i, out.stats)

    def end() -> dict[str, Any]:
        if tracker is None:
            return {"experts_events": 0, "balance_last": None}
        tracker.flush()
        return {"experts_events": tracker.events, "balance_last": tracker.last}

    return Steps(step, p["tokens_per_step"], b.ran, extra=tracker.extra if tracker is not None else None, end=end,
                 meta={"flops_per_token": p["flops_per_token"], "params": p["params"], **meta})


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return print_plan(opts, plan)
    from workloads.harness import Harness

    return Harness("moe", opts).run(plan, setup)


def main(argv: list[str] | None = None) -> int:
    return run_main(MOE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
