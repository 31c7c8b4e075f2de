"""The tensor-parallel validation workload's declaration."""

from collections.abc import Mapping
from typing import Any

from workloads.models.config import PRESETS
from workloads.models.moe_config import MOE_PRESETS
from workloads.options import Machine, Option, WorkloadSpec
from workloads.specs.dense import CP_ATTENTION, CP_ATTENTION_HELP, PRESET_RUN_DEFAULTS, cp_checks, tp_checks
from workloads.specs.moe import ep_checks


def validate_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """The degrees (one at least > 1; the fault's degree present) and --tp against the GPUs and the chosen
    model's heads (and expert width for MoE)."""
    tp, dp = int(opts.get("tp") or 1), int(opts.get("dp_shard") or 1) * int(opts.get("dp_replicate") or 1)
    cp = int(opts.get("cp") or 1)
    if tp * dp * cp == 1:
        return [("tp", "nothing to validate: give --tp, --dp-shard, --dp-replicate or --cp > 1")]
    if opts.get("fault") == "cp-local-keys" and cp == 1:
        return [("fault", "--fault cp-local-keys plants a context-parallel bug: it needs --cp > 1")]
    if cp > 1:
        moe = opts.get("model") == "moe"
        arch = "llama" if moe else getattr(PRESETS.get(str(opts.get("preset"))), "arch", None)
        found = cp_checks(opts, None, arch)
        if found:
            return found
    if opts.get("fault") == "missing-allreduce" and tp == 1:
        return [("fault", "--fault missing-allreduce plants a TP bug: it needs --tp > 1")]
    if opts.get("fault") == "skip-grad-sync" and dp == 1:
        return [("fault", "--fault skip-grad-sync plants a data-parallel bug: it needs --dp-shard or --dp-replicate "
                          "> 1")]
    if opts.get("fault") == "ep-misroute" and int(opts.get("ep") or 1) == 1:
        return [("fault", "--fault ep-misroute plants an expert-parallel bug: it needs --ep > 1")]
    if opts.get("model") != "moe":
        if int(opts.get("ep") or 1) > 1:
            return [("ep", "--ep: the dense model has no experts; expert parallelism is for --model moe")]
        return tp_checks(opts, machine)
    cfg = MOE_PRESETS.get(str(opts.get("preset")))
    if cfg is None:
        return [("preset", f"--model moe: --preset must be one of {', '.join(MOE_PRESETS)}")]
    return tp_checks(opts, machine, {"attention heads": cfg.base.n_heads, "KV heads": cfg.base.n_kv_heads,
                                     "expert width": cfg.expert_d_ff}) + ep_checks(opts, cfg.n_experts)

def preset_values(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What --layers 0 resolves to: the chosen model's preset's layer count."""
    from workloads.models.config import PRESETS

    preset = str(opts.get("preset"))
    if opts.get("model") == "moe":
        return {"layers": MOE_PRESETS[preset].base.n_layers}
    return {"layers": PRESETS[preset].n_layers}


TP_VALIDATE = WorkloadSpec(
    name="tp-validate",
    module="workloads.tp_validate",
    description="Same weights and inputs in one process and on a mesh: compares logits, loss and gradients tensor "
                "by tensor (--tp, --dp-shard, --dp-replicate, --cp, --ep and their product)",
    presets=tuple(dict.fromkeys((*PRESET_RUN_DEFAULTS, *MOE_PRESETS))),
    default_preset="tiny",
    cpu_preset="tiny-llama",
    options=(
        Option("model", str, "dense", "which model to shard: the dense decoder, or the MoE decoder (TP inside "
               "the routed experts)", ("dense", "moe"), group="shape"),
        Option("tp", int, 2, "tensor-parallel degree to validate against one process", min=1, max=1024,
               group="parallel"),
        Option("dp-shard", int, 1, "FSDP2 degree (each rank a slice of the global batch; gradients reduced)", min=1,
               max=1024, group="parallel"),
        Option("dp-replicate", int, 1, "replicas (HSDP with --dp-shard > 1)", min=1, max=1024, group="parallel"),
        Option("ep", int, 1, "--model moe: expert parallelism over the --dp-shard ranks (N = --dp-shard)", min=1,
               max=1024, group="parallel"),
        Option("cp", int, 1, "context-parallel degree (each rank two chunks of each sequence; FSDP spans "
               "--dp-shard x --cp)", min=1, max=1024, when=(("mode", ("train",)),), group="parallel"),
        Option("cp-attention", str, "gather", CP_ATTENTION_HELP, CP_ATTENTION, when=(("mode", ("train",)),),
               group="parallel"),
        Option("mode", str, "train", "train: logits, loss and every gradient; prefill: logits only",
               ("train", "prefill"), group="shape"),
        Option("batch-size", int, 2, "sequences per data-parallel rank (the reference runs all of them)", min=1,
               max=4096, group="shape"),
        Option("seq-len", int, 64, "tokens per sequence", min=1, max=1 << 20, group="shape"),
        Option("layers", int, 0, "truncate the preset to N layers (0: all)", min=0, max=1024, group="shape"),
        Option("dtype", str, "auto", "compute dtype (auto: bf16 on GPU, fp32 on CPU); tolerances follow it",
               ("auto", "bf16", "fp16", "fp32"), group="knobs"),
        Option("fault", str, "none", "plant a sharding bug to prove the check catches it (missing-allreduce: "
               "layer 0's attention output skips its TP all-reduce; skip-grad-sync: block 0's gradients are never "
               "reduced across the data-parallel ranks; ep-misroute: tokens reach the next expert of their rank; "
               "cp-local-keys: each context-parallel rank attends its own keys only)",
               ("none", "missing-allreduce", "skip-grad-sync", "ep-misroute", "cp-local-keys"),
               group="knobs"),
    ),
    checks=validate_checks,
    preset_values=preset_values,
)
