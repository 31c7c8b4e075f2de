"""The dense transformer workload's declaration."""

from workloads.options import Option, WorkloadSpec

#: Per-preset run shape used when --batch-size / --seq-len / --steps are left at 0.
PRESET_RUN_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"batch_size": 8, "seq_len": 128, "steps": 30},
    "tiny-llama": {"batch_size": 8, "seq_len": 128, "steps": 30},
    "gpt-large": {"batch_size": 1, "seq_len": 8192, "steps": 30},
    "llama-3.1-8b": {"batch_size": 1, "seq_len": 8192, "steps": 30},
    "llama-3.1-70b": {"batch_size": 1, "seq_len": 8192, "steps": 30},
}

DENSE = WorkloadSpec(
    name="dense",
    module="workloads.dense",
    description="Dense Llama/GPT-style decoder: train (fwd+bwd+AdamW), prefill or decode on synthetic tokens",
    presets=tuple(PRESET_RUN_DEFAULTS),
    default_preset="tiny",
    cpu_preset="tiny",
    options=(
        Option("mode", str, "train",
               "train: fwd+bwd+AdamW; prefill: no-grad forward; decode: 1 token/step against a KV cache",
               ("train", "prefill", "decode"), group="shape"),
        Option("batch-size", int, 0, "sequences per step (0: the preset's)", min=0, max=65536, group="shape"),
        Option("seq-len", int, 0, "tokens per sequence, or KV context in decode (0: the preset's)", min=0,
               max=1 << 20, group="shape"),
        Option("layers", int, 0, "truncate the preset to N layers (0: all)", min=0, max=1024, group="shape"),
        Option("dtype", str, "auto", "compute dtype (auto: bf16 on GPU, fp32 on CPU)",
               ("auto", "bf16", "fp16", "fp32"), group="knobs"),
        Option("attention-backend", str, "auto", "SDPA kernel forced, or FlexAttention",
               ("auto", "flash", "cudnn", "efficient", "math", "flex"), group="knobs"),
        Option("compile-mode", str, "none", "torch.compile mode",
               ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"), group="knobs"),
        Option("lr", float, 3e-4, "AdamW learning rate", min=0, max=10, when=(("mode", ("train",)),), group="knobs"),
        Option("dry-run", bool, False, "print the plan as JSON (config, parameters, FLOPs, memory) and exit"),
    ),
)
