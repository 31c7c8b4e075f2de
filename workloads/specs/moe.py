"""The MoE workload's declaration and its before-launch checks (torch-free)."""

from collections.abc import Mapping
from typing import Any

from workloads.models.moe_config import MOE_PRESETS, resolve
from workloads.options import Machine, Option, WorkloadSpec
from workloads.specs.dense import START_LARGEST, TRANSFORMER_KNOBS, cp_checks, transformer_checks

#: Per-preset run shape and balancing defaults, used where the options are left at 0 / auto / unset.
PRESET_RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"batch_size": 8, "seq_len": 128, "steps": 50, "balance": "aux-free", "bias_update_rate": 1e-2},
    "moe-64e-top6": {"batch_size": 1, "seq_len": 4096, "steps": 20, "balance": "aux-free", "bias_update_rate": 1e-3},
    "mixtral-8x7b": {"batch_size": 1, "seq_len": 4096, "steps": 20, "balance": "aux-loss", "bias_update_rate": 1e-3},
    "gpt4-style": {"batch_size": 1, "seq_len": 4096, "steps": 20, "balance": "aux-loss", "bias_update_rate": 1e-3},
}
assert set(PRESET_RUN_DEFAULTS) == set(MOE_PRESETS)
#: The run shape and balancing of a --checkpoint run when the options are left at 0 / auto / unset (the sequence
#: is cut to the checkpoint's context; Mixtral was trained with the Switch auxiliary loss).
CHECKPOINT_RUN_DEFAULTS: dict[str, Any] = {"batch_size": 1, "seq_len": 1024, "steps": 20, "balance": "aux-loss",
                                           "bias_update_rate": 1e-3}

BALANCE = ("auto", "none", "aux-loss", "aux-free", "both")
#: The Hugging Face model types the moe workload runs (workloads.checkpoint.FAMILIES with an MoE config).
MOE_MODEL_TYPES = ("mixtral",)


def preset_values(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What the shape, routing and balancing options left to the preset resolve to (--layers included)."""
    if opts.get("checkpoint"):  # the checkpoint's shape is only known once it is read (the run's plan says it)
        return {k: v for k, v in CHECKPOINT_RUN_DEFAULTS.items()
                if k in ("batch_size", "balance", "bias_update_rate") or (k == "steps" and not opts.get("duration"))}
    preset = str(opts.get("preset"))
    cfg = MOE_PRESETS[preset]
    out: dict[str, Any] = {k: v for k, v in PRESET_RUN_DEFAULTS[preset].items()
                           if k != "steps" or not opts.get("duration")}
    if opts.get("layers"):
        cfg = cfg.with_layers(int(opts["layers"]))
    out.update(layers=cfg.base.n_layers, num_moe_layers=cfg.n_moe_layers, num_experts=cfg.n_experts,
               top_k=cfg.top_k, num_shared_experts=cfg.n_shared, router=cfg.router)
    return out


def checkpoint_contradictions(opts: Mapping[str, Any], layers: int | None, experts: int | None,
                              top_k: int | None, context: int | None) -> list[tuple[str, str]]:
    """The shape knobs of ``opts`` that contradict a Mixtral checkpoint of ``layers`` layers (every one MoE, no
    shared experts, the softmax router), ``experts`` routed experts, ``top_k`` per token and a context of
    ``context`` positions (None: not known, not checked): ``[(option, reason)]``. The console's check before
    launch (from config.json) and the plan's (from the parsed config) are this one."""
    out: list[tuple[str, str]] = []
    for key, have, what in (("layers", layers, "layers, and runs whole"), ("num_moe_layers", layers, "MoE layers"),
                            ("num_experts", experts, "routed experts per layer"),
                            ("top_k", top_k, "experts per token"), ("num_shared_experts", 0, "shared experts")):
        value, flag = opts.get(key), "--" + key.replace("_", "-")
        if have is not None and value is not None and value != have and (key != "layers" or value):
            out.append((flag[2:], f"{flag} {value}: the checkpoint has {have} {what} (leave {flag} "
                                  f"{'at 0' if key == 'layers' else 'unset'})"))
    if opts.get("router") not in (None, "auto", "softmax"):
        out.append(("router", f"--router {opts['router']}: the checkpoint's router is softmax (leave --router auto)"))
    seq = opts.get("seq_len") or 0
    if context is not None and seq > context:
        out.append(("seq-len", f"--seq-len {seq}: the checkpoint's context is {context} positions"))
    return out


def moe_checkpoint_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """--checkpoint before launch, without torch (workloads.checkpoint_files): the files, a Mixtral config.json,
    its tensors against it, and the shape knobs against it."""
    from workloads.checkpoint_files import CheckpointError, check_files

    if not opts.get("checkpoint"):
        return []
    path = str(opts["checkpoint"])
    try:
        d, _, _ = check_files(path, MOE_MODEL_TYPES)
    except CheckpointError as exc:
        return [("checkpoint", f"--checkpoint {exc}")]

    def num(key: str) -> int | None:
        v = d.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return checkpoint_contradictions(opts, num("num_hidden_layers"), num("num_local_experts"),
                                     num("num_experts_per_tok"), num("max_position_embeddings") or 2048)


def ep_checks(opts: Mapping[str, Any], experts: int | None) -> list[tuple[str, str]]:
    """--ep: on one replica's FSDP ranks (--dp-shard x --cp, the same degree; with --dp-replicate every replica
    holds the same experts; with --tp each expert's width is split too), dividing the routed experts."""
    ep = int(opts.get("ep") or 1)
    if ep == 1:
        return []
    shard, cp = (int(opts.get(k) or 1) for k in ("dp_shard", "cp"))
    if shard * cp != ep:
        have = f"--dp-shard {shard}" + (f" x --cp {cp}" if cp > 1 else "")
        return [("ep", f"--ep {ep} splits the experts over the --dp-shard x --cp ranks: they number {ep} (now "
                       f"{have})")]
    if experts is not None and experts % ep:
        return [("ep", f"--ep {ep} must divide the routed experts ({experts})")]
    return []


def moe_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """The transformer knobs' checks, then the MoE shape: top-k vs experts, MoE layers vs layers, capacity.

    With ``--checkpoint`` the shape is the checkpoint's: its files and the knobs that contradict it are checked
    instead of the preset's shape (``moe_checkpoint_checks``).
    """
    checkpoint = bool(opts.get("checkpoint"))
    divides: dict[str, int] = {}
    experts: int | None = None
    if not checkpoint:
        try:
            cfg = resolve(opts)
            divides = {"attention heads": cfg.base.n_heads, "KV heads": cfg.base.n_kv_heads,
                       "expert width": cfg.expert_d_ff}
            experts = cfg.n_experts
        except ValueError:
            pass
    out = transformer_checks(opts, machine, divides) + ep_checks(opts, experts)
    defaults = CHECKPOINT_RUN_DEFAULTS if checkpoint else PRESET_RUN_DEFAULTS.get(str(opts.get("preset")), {})
    out += cp_checks(opts, defaults.get("seq_len"), "llama")
    cf = opts.get("capacity_factor")
    if cf is not None and cf <= 0:
        out.append(("capacity-factor", f"--capacity-factor {cf:g}: a capacity factor must be > 0 "
                                       "(leave it unset to drop no tokens)"))
        return out
    if checkpoint:
        out += moe_checkpoint_checks(opts)
    else:
        try:
            resolve(opts)
        except ValueError as exc:
            out.append(("shape", str(exc)))
    if opts.get("mode") == "prefill" and opts.get("balance") not in (None, "auto", "none"):
        out.append(("balance", f"--balance {opts['balance']}: balancing acts through training; "
                               "use --mode train or --balance none"))
    return out


MOE = WorkloadSpec(
    name="moe",
    module="workloads.moe",
    description="Mixture-of-Experts decoder: router, routed + shared SwiGLU experts, balancing, expert balance "
                "metrics; train or prefill on synthetic tokens",
    presets=tuple(PRESET_RUN_DEFAULTS),
    default_preset="tiny",
    cpu_preset="tiny",
    options=(
        Option("mode", str, "train", "train: fwd+bwd+AdamW; prefill: no-grad forward", ("train", "prefill"),
               group="shape"),
        Option("batch-size", int, 0, "sequences per step (0: the preset's)", min=0, max=65536, group="shape",
               tune=(1, 2, 4, 8, 16), tune_start=START_LARGEST),
        Option("seq-len", int, 0, "tokens per sequence (0: the preset's)", min=0, max=1 << 20, group="shape"),
        Option("layers", int, 0, "truncate the preset to its first N layers, keeping at least one MoE layer "
               "(0: all)", min=0, max=1024, group="shape"),
        Option("checkpoint", str, "", "a Mixtral checkpoint directory (Hugging Face config.json + safetensors): its "
               "weights and shape instead of a preset's random ones (--preset is ignored; --layers, --num-*, "
               "--top-k and --router other than the checkpoint's are refused; --capacity-factor applies)",
               group="shape"),
        Option("num-moe-layers", int, None, "how many of the last layers are MoE (the rest dense, first; "
               "unset: the preset's)", min=1, max=1024, group="shape"),
        Option("num-experts", int, None, "routed experts per MoE layer (unset: the preset's)", min=1, max=4096,
               group="shape"),
        Option("top-k", int, None, "routed experts per token (unset: the preset's)", min=1, max=4096,
               group="shape"),
        Option("num-shared-experts", int, None, "always-on shared experts (unset: the preset's)", min=0,
               max=64, group="shape"),
        Option("router", str, "auto", "routing scores: softmax (Mixtral) or sigmoid (DeepSeek-V3); auto: the "
               "preset's", ("auto", "softmax", "sigmoid"), group="shape"),
        Option("capacity-factor", float, None, "each expert takes at most factor·tokens·k/E assignments per "
               "step, the rest are dropped (unset: no dropping)", min=0, max=1024, group="shape"),
        Option("expert-impl", str, "auto", "loop: a per-expert Python loop; grouped: tokens sorted by expert, "
               "one grouped GEMM (torch._grouped_mm on Hopper/Blackwell bf16, else padded bmm); auto: grouped",
               ("auto", "loop", "grouped"), group="knobs"),
        Option("balance", str, "auto", "load balancing: Switch auxiliary loss, DeepSeek-V3 aux-free selection "
               "bias, both, none (auto: the preset's)", BALANCE, group="knobs"),
        Option("aux-loss-coef", float, 1e-2, "weight of the Switch balance loss E·Σ f_i·P_i (summed over MoE "
               "layers)", min=0, max=100, when=(("balance", ("auto", "aux-loss", "both")),), group="knobs"),
        Option("bias-update-rate", float, None, "aux-free: selection-bias step per training step, sign rule "
               "(unset: the preset's; 1e-3 for the full-size presets, 1e-2 for tiny)", min=0, max=10,
               when=(("balance", ("auto", "aux-free", "both")),), group="knobs"),
        Option("balance-metrics", str, "on", "collect expert-balance figures and emit them once per window",
               ("on", "off"), group="knobs"),
        Option("balance-window", int, 10, "steps per expert-balance window", min=1, max=1 << 20, group="knobs"),
        Option("data", str, "uniform", "synthetic tokens: uniform, or zipf-skewed (seeded) so routing starts "
               "imbalanced", ("uniform", "zipf"), group="shape"),
        Option("zipf-exponent", float, 1.2, "zipf: token frequency ∝ 1/rank^s", min=0, max=10,
               when=(("data", ("zipf",)),), group="shape"),
        *TRANSFORMER_KNOBS,
        Option("ep", int, 1, "expert parallelism: the routed experts split over N ranks, tokens dispatched to their "
               "expert's rank and back with all-to-all; the ranks are --dp-shard's (N = --dp-shard)", min=1,
               max=1024, when=(("mode", ("train",)),), group="parallel"),
        Option("lr", float, 3e-4, "AdamW learning rate", min=0, max=10, when=(("mode", ("train",)),), group="knobs"),
        Option("dry-run", bool, False, "print the plan as JSON (config, active parameters, FLOPs, memory) and exit"),
    ),
    checks=moe_checks,
    preset_values=preset_values,
)
