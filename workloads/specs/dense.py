"""The dense transformer workload's declaration and its before-launch checks."""

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workloads.options import LARGEST, Machine, Option, WorkloadSpec
from workloads.tokens import BIN_DTYPES, DataError, train_ids

if TYPE_CHECKING:
    from workloads.models.config import ModelConfig

#: The run shape of a --checkpoint run when --batch-size / --seq-len / --steps are left at 0 (the sequence is cut
#: to the checkpoint's context).
CHECKPOINT_RUN_DEFAULTS: dict[str, int] = {"batch_size": 1, "seq_len": 1024, "steps": 30}
#: Per-preset run shape used when --batch-size / --seq-len / --steps are left at 0.
PRESET_RUN_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"batch_size": 8, "seq_len": 128, "steps": 30},
    "tiny-llama": {"batch_size": 8, "seq_len": 128, "steps": 30},
    "gpt-large": {"batch_size": 1, "seq_len": 8192, "steps": 30},
    "llama-3.1-8b": {"batch_size": 1, "seq_len": 8192, "steps": 30},
    "llama-3.1-70b": {"batch_size": 1, "seq_len": 8192, "steps": 30},
}
GPU_KERNELS = ("cudnn", "efficient")  # flash has a CPU kernel too
FP8_RECIPES = ("auto", "delayed", "current", "tensorwise", "rowwise")
TE_RECIPES, TORCHAO_RECIPES = ("delayed", "current"), ("tensorwise", "rowwise")


def preset_values(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What --batch-size, --seq-len, --steps (both it and --duration at 0) and --layers at 0 resolve to."""
    from workloads.models.config import PRESETS

    preset = str(opts.get("preset"))
    if opts.get("checkpoint"):  # the checkpoint's shape is only known once it is read (the run's plan says it)
        return {k: v for k, v in CHECKPOINT_RUN_DEFAULTS.items() if k == "batch_size" or
                (k == "steps" and not opts.get("duration"))}
    out: dict[str, Any] = {k: v for k, v in PRESET_RUN_DEFAULTS[preset].items()
                           if k != "steps" or not opts.get("duration")}
    out["layers"] = PRESETS[preset].n_layers
    return out


def on_gpu(opts: Mapping[str, Any], machine: Machine) -> bool:
    return opts.get("device") != "cpu" and bool(machine.gpus)


def tp_checks(opts: Mapping[str, Any], machine: Machine,
              divides: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """--tp against what it must divide (default: the dense preset's heads), and the processes (--tp, times
    --replicas where the workload serves replicas) against the GPUs visible on this node."""
    from workloads.models.config import PRESETS

    tp, replicas = int(opts.get("tp") or 1), int(opts.get("replicas") or 1)
    out: list[tuple[str, str]] = []
    if tp > 1 and not (divides is None and opts.get("checkpoint")):  # a checkpoint's heads: checked at build
        if divides is None:
            cfg = PRESETS.get(str(opts.get("preset")))
            divides = {} if cfg is None else {"attention heads": cfg.n_heads, "KV heads": cfg.n_kv_heads}
        bad = [f"{what} ({n})" for what, n in divides.items() if n % tp]
        if bad:
            out.append(("tp", f"--tp {tp} must divide the {' and '.join(bad)} of {opts.get('preset')}"))
    nnodes = max(int(opts.get("nnodes") or 1), 1)
    world = processes(opts)
    per_node = world // nnodes
    if on_gpu(opts, machine) and per_node > len(machine.gpus):
        what, key = (f"--replicas {replicas} x --tp {tp}", "replicas") if replicas > 1 else (f"--tp {tp}", "tp")
        if world != tp * replicas:
            what, key = degrees_text(opts), "dp-shard"
        out.append((key, f"{what} needs {per_node} GPUs on this node; {len(machine.gpus)} visible"))
    return out


def processes(opts: Mapping[str, Any]) -> int:
    """The run's world size: the product of its parallel degrees (--tp, --dp-shard, --dp-replicate; serving:
    --replicas x --tp)."""
    n = 1
    for name in ("tp", "replicas", "dp_shard", "dp_replicate", "cp"):
        n *= max(int(opts.get(name) or 1), 1)
    return n


def degrees_text(opts: Mapping[str, Any]) -> str:
    """``--dp-replicate 2 x --dp-shard 2 x --tp 1``: the degrees that make the world size (``--cp`` when > 1)."""
    names = ("dp_replicate", "dp_shard", *(("cp",) if int(opts.get("cp") or 1) > 1 else ()), "tp")
    return " x ".join(f"--{n.replace('_', '-')} {int(opts.get(n) or 1)}" for n in names)


def cp_checks(opts: Mapping[str, Any], default_seq: int | None, arch: str | None) -> list[tuple[str, str]]:
    """--cp (declared for --mode train only): a RoPE model whose sequence (--seq-len, else ``default_seq``) splits
    into 2 x cp equal chunks (each rank takes chunks i and 2cp-1-i, so causal work is balanced), on an SDPA kernel
    (keys and values are all-gathered; the queries' chunks attend with lower-right causal masks; PyTorch's ring,
    ``--cp-attention ring*``, runs the flash kernel: auto or flash), without a sliding window."""
    cp = int(opts.get("cp") or 1)
    if cp == 1:
        return []
    seq_len = int(opts.get("seq_len") or default_seq or 0) or None
    if arch is not None and arch != "llama":
        return [("cp", f"--cp {cp}: needs RoPE positions (llama-style models); {opts.get('preset')} learns "
                       "absolute positions")]
    if seq_len is not None and seq_len % (2 * cp):
        return [("cp", f"--cp {cp}: the sequence ({seq_len}) must split into 2 x {cp} equal chunks (a multiple of "
                       f"{2 * cp})")]
    if opts.get("attention_backend") == "flex":
        return [("attention-backend", f"--cp {cp}: FlexAttention cannot take the gathered keys here; use an SDPA "
                                      "kernel (auto, flash, cudnn, efficient, math)")]
    if opts.get("attention_window"):
        return [("attention-window", f"--cp {cp} with a sliding window is not supported")]
    ring = str(opts.get("cp_attention") or "gather")
    if ring != "gather" and opts.get("attention_backend") not in (None, "auto", "flash"):
        return [("cp-attention", f"--cp-attention {ring} runs the flash kernel (PyTorch's ring); use "
                                 "--attention-backend flash or auto, or --cp-attention gather")]
    return []


def transformer_checks(opts: Mapping[str, Any], machine: Machine,
                       tp_divides: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """What this machine cannot run of the transformer knobs, with the reason (shared by dense and MoE)."""
    out: list[tuple[str, str]] = []
    gpu = on_gpu(opts, machine)
    fp8, recipe = opts.get("fp8_mode", "off"), opts.get("fp8_recipe", "auto")
    ring = int(opts.get("cp") or 1) > 1 and str(opts.get("cp_attention") or "gather") != "gather"
    if ring and gpu and opts.get("dtype") == "fp32":
        out.append(("dtype", f"--cp-attention {opts['cp_attention']}: the ring's flash kernel on a GPU takes bf16 or "
                             "fp16, not fp32"))
    if fp8 in ("te", "torchao"):
        module = "transformer_engine" if fp8 == "te" else "torchao"
        if not gpu:
            out.append(("fp8-mode", f"--fp8-mode {fp8}: FP8 needs an NVIDIA GPU with FP8 tensor cores; "
                                    "running on CPU"))
        elif not machine.fp8_gpus:
            out.append(("fp8-mode", f"--fp8-mode {fp8}: this GPU has no FP8 tensor cores (compute capability < 8.9)"))
        elif module not in machine.modules:
            extra = "te" if fp8 == "te" else "fp8"
            out.append(("fp8-mode", f"--fp8-mode {fp8}: {module} is not installed (pip install 'btune[{extra}]')"))
        allowed = TE_RECIPES if fp8 == "te" else TORCHAO_RECIPES
        if recipe != "auto" and recipe not in allowed:
            out.append(("fp8-recipe", f"--fp8-recipe {recipe} is not a {fp8} recipe; allowed: {', '.join(allowed)}"))
    backend = opts.get("attention_backend", "auto")
    if backend in GPU_KERNELS and not gpu:
        out.append(("attention-backend", f"--attention-backend {backend}: the SDPA {backend} kernel needs a CUDA GPU"))
    if backend == "flex" and not gpu and opts.get("mode", "train") == "train":
        out.append(("attention-backend", "--attention-backend flex: FlexAttention has no backward on CPU"))
    if opts.get("attention_window") and backend == "flash":
        out.append(("attention-window", "--attention-window: the flash kernel takes no mask; use flex or efficient"))
    out += tp_checks(opts, machine, tp_divides)
    if opts.get("compile_mode", "none") != "none" and opts.get("compile_mode") != "default" and not gpu:
        out.append(("compile-mode", f"--compile-mode {opts.get('compile_mode')}: CUDA graphs and autotuning "
                                    "need a GPU; use default on CPU"))
    return out


#: The Hugging Face model types the dense workload runs (workloads.checkpoint.FAMILIES with a dense config).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def checkpoint_checks(opts: Mapping[str, Any], types: tuple[str, ...] = DENSE_MODEL_TYPES) -> list[tuple[str, str]]:
    """--checkpoint's files before launch, without torch (workloads.checkpoint_files): the directory, config.json,
    its model_type, the shards, their headers and dtypes, the tensors and their shapes against the config."""
    from workloads.checkpoint_files import CheckpointError, check_files

    if not opts.get("checkpoint"):
        return []
    try:
        check_files(str(opts["checkpoint"]), types)
    except CheckpointError as exc:
        return [("checkpoint", f"--checkpoint {exc}")]
    return []


#: --rope-theta, declared once for the workloads that build btune's dense Transformer (dense, perplexity) and applied
#: to the model's config by ``model_overrides`` (the plan's config; ``workloads.checkpoint.load`` for a checkpoint).
ROPE_THETA = Option("rope-theta", float, 0.0, "override the model's RoPE base (rope_theta) with this value: a "
                    "different model, e.g. a wrong setting for the quality gate to catch (0: the model's own)",
                    min=0, max=1e12, group="knobs")


def model_overrides(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The model knobs as the config fields they replace (``--rope-theta``: ``rope_theta``); empty when none is set."""
    return {"rope_theta": float(opts["rope_theta"])} if opts.get("rope_theta") else {}


def rope_refusal(arch_or_type: str) -> str | None:
    """Why --rope-theta cannot apply to a model of this arch or ``model_type`` (GPT-2 has no RoPE), or None."""
    if arch_or_type in ("gpt", "gpt2"):
        return "--rope-theta: a GPT-2-style model has no RoPE (learned positions); the option is for llama-arch models"
    return None


def apply_overrides(cfg: "ModelConfig", opts: Mapping[str, Any]) -> "ModelConfig":
    """``cfg`` with the model knobs applied and validated; ValueError when a knob cannot apply to its arch."""
    overrides = model_overrides(opts)
    if not overrides:
        return cfg
    why = rope_refusal(cfg.arch)
    if why:
        raise ValueError(why)
    return dataclasses.replace(cfg, **overrides).validate()


def _model_shape(opts: Mapping[str, Any]) -> tuple[str, int, int | None]:
    """The model's arch (or ``model_type``), vocabulary and context (None: a preset's, which grows with
    --seq-len), from the preset or the checkpoint's config.json (CheckpointError when it cannot be read)."""
    from workloads.checkpoint_files import read_config
    from workloads.models.config import PRESETS

    if opts.get("checkpoint"):
        d = read_config(str(opts["checkpoint"]), DENSE_MODEL_TYPES)
        context = d.get("max_position_embeddings") or d.get("n_positions")
        return str(d["model_type"]), int(d.get("vocab_size") or 0), int(context) if context else None
    cfg = PRESETS[str(opts.get("preset"))]
    return cfg.arch, cfg.vocab_size, None


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _data_problem(path: str, fmt: str, dtype: str, vocab: int, need: int, _stamp: tuple[int, int] | None) -> str | None:
    """train_ids' refusal of one version of a file (the form asks on every change), or None."""
    try:
        train_ids(path, fmt, dtype, vocab=vocab, need=need)
    except DataError as exc:
        return str(exc)
    except OSError as exc:  # a file that went away between two looks
        return f"--data {path}: cannot read it ({exc.strerror or exc})"
    return None


def model_fit_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """--data (a token file the model can train on: ids inside its vocabulary, one sequence long at least) and
    --rope-theta against the model, before launch; the checkpoint's own problems are checkpoint_checks'."""
    from workloads.checkpoint_files import CheckpointError

    if not opts.get("data") and not opts.get("rope_theta"):
        return []
    try:
        arch, vocab, context = _model_shape(opts)
    except (CheckpointError, KeyError):
        return []  # checkpoint_checks (or the preset's choices) say why
    out: list[tuple[str, str]] = []
    why = rope_refusal(arch) if opts.get("rope_theta") else None
    if why:
        out.append(("rope-theta", why))
    if opts.get("data") and opts.get("mode", "train") == "train" and vocab > 0:
        run_defaults = CHECKPOINT_RUN_DEFAULTS if opts.get("checkpoint") else PRESET_RUN_DEFAULTS[str(opts["preset"])]
        seq = int(opts.get("seq_len") or min(run_defaults["seq_len"], context or run_defaults["seq_len"]))
        path = str(opts["data"])
        problem = _data_problem(path, str(opts.get("data_format") or "auto"), str(opts.get("data_dtype") or "uint16"),
                                vocab, seq + 1, _stamp(path))
        if problem:
            out.append(("data", problem))
    return out


def dense_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """The transformer knobs' checks, then --checkpoint's files, then --data and --rope-theta against the model."""
    found = checkpoint_checks(opts)
    out = transformer_checks(opts, machine) + (found or model_fit_checks(opts))
    if int(opts.get("cp") or 1) > 1 and not found:
        from workloads.checkpoint_files import CheckpointError

        try:
            arch = _model_shape(opts)[0]
        except (CheckpointError, KeyError):
            arch = None
        defaults = CHECKPOINT_RUN_DEFAULTS if opts.get("checkpoint") else PRESET_RUN_DEFAULTS.get(
            str(opts.get("preset")), {})
        rope = "llama" if arch in ("llama", "mistral", "qwen2") else arch  # checkpoints' RoPE families
        out += cp_checks(opts, defaults.get("seq_len"), rope)
    return out


#: --cp's attention: btune's all-gather, or PyTorch's ring attention with either of its rotaters (workloads/ring.py)
CP_ATTENTION = ("gather", "ring", "ring-gather")
CP_ATTENTION_HELP = ("--cp's attention: gather (keys and values all-gathered once per layer, one SDPA per query "
                     "chunk), ring (PyTorch's ring attention: keys and values passed rank to rank, flash kernel "
                     "per step, merged by log-sum-exp), ring-gather (the ring's steps over one all-gather)")

#: the tuner starts a batch size at the largest predicted to fit, on any device
START_LARGEST = (("cuda", LARGEST), ("cpu", LARGEST))

TRANSFORMER_KNOBS: tuple[Option, ...] = (
    Option("dtype", str, "auto", "compute dtype (auto: bf16 on GPU, fp32 on CPU)",
           ("auto", "bf16", "fp16", "fp32"), group="knobs"),
    Option("fp8-mode", str, "off", "FP8 training: Transformer Engine, torchao, auto (te, else torchao, else off)",
           ("off", "auto", "te", "torchao"), group="knobs", tune=("off", "torchao", "te")),
    Option("fp8-recipe", str, "auto", "te: delayed|current scaling; torchao: tensorwise|rowwise (auto: te delayed, "
           "torchao tensorwise)", FP8_RECIPES, when=(("fp8-mode", ("auto", "te", "torchao")),), group="knobs",
           tune=("auto", *TE_RECIPES, *TORCHAO_RECIPES)),
    Option("fp8-head", bool, False, "run the LM head in FP8 too (off: high precision, as torchtitan does)",
           when=(("fp8-mode", ("auto", "te", "torchao")),), group="knobs"),
    Option("attention-backend", str, "auto", "SDPA with a kernel forced, or FlexAttention (compiled, block masks)",
           ("auto", "flash", "cudnn", "efficient", "math", "flex"), group="knobs",
           tune=("flash", "cudnn", "efficient", "flex")),
    Option("attention-window", int, 0, "sliding-window attention over the last N tokens (0: full causal)",
           min=0, max=1 << 20, group="knobs"),
    Option("compile-mode", str, "none", "torch.compile mode (compile time is reported on its own)",
           ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"), group="knobs",
           # the tuner starts compiled on a GPU (+13-17% in every H200 measurement, docs/benchmarks.md); max-autotune
           # costs minutes per trial (H200, 4 layers: 284 s): name it in --space
           tune=("none", "default"), tune_start=(("cuda", "default"),)),
    Option("tp", int, 1, "tensor-parallel degree: torchrun, one process per GPU (gloo on CPU)", min=1, max=1024,
           group="parallel", tune=(1, 2, 4, 8)),
    Option("activation-checkpointing", bool, False, "recompute each block in backward to save memory",
           when=(("mode", ("train",)),), group="knobs", tune=(False, True)),
    Option("dp-shard", int, 1, "FSDP2 over N ranks: parameters, gradients and optimizer state sharded (fully_shard "
           "per block and the root; bf16 parameters, fp32 gradient reduction); --batch-size is per rank",
           min=1, max=1024, when=(("mode", ("train",)),), group="parallel"),
    Option("dp-replicate", int, 1, "data-parallel replicas of the model (with --dp-shard > 1: HSDP, each replica "
           "sharded, gradients all-reduced across replicas); --batch-size is per rank", min=1, max=1024,
           when=(("mode", ("train",)),), group="parallel"),
    Option("cp", int, 1, "context parallelism over N ranks: each sequence split into 2N chunks (rank i keeps "
           "chunks i and 2N-1-i: causal work balanced), keys and values all-gathered per layer; FSDP spans "
           "--dp-shard x --cp", min=1, max=1024, when=(("mode", ("train",)),), group="parallel"),
    Option("cp-attention", str, "gather", CP_ATTENTION_HELP, CP_ATTENTION, when=(("mode", ("train",)),),
           group="parallel"),
    Option("reshard-after-forward", str, "on", "FSDP2: free each block's gathered parameters after its forward "
           "(on: less memory, a second all-gather in backward; off: kept until backward)", ("on", "off"),
           when=(("mode", ("train",)),), group="parallel"),
    Option("memory-profile", int, 0, "record CUDA memory history for N steps from step 1 (step 0 holds start-up) "
           "and save the snapshot beside the record; 0: off", min=0, max=10_000),
)

#: The data-parallel knobs (training: dense and MoE).
DATA_PARALLEL = ("dp-shard", "dp-replicate", "reshard-after-forward")
#: Knobs only a training run has (serving leaves them out of its declaration).
TRAINING_ONLY = ("activation-checkpointing", *DATA_PARALLEL, "cp", "cp-attention")

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
        Option("batch-size", int, 0, "sequences per step (0: the preset's)", min=0, max=65536, group="shape",
               tune=(1, 2, 4, 8, 16), tune_start=START_LARGEST),
        Option("seq-len", int, 0, "tokens per sequence, or KV context in decode (0: the preset's)", min=0,
               max=1 << 20, group="shape"),
        Option("layers", int, 0, "truncate the preset to N layers (0: all)", min=0, max=1024, group="shape"),
        Option("checkpoint", str, "", "a Hugging Face checkpoint directory (config.json + safetensors: llama, "
               "mistral, qwen2, gpt2): its weights and shape instead of random ones (--preset is "
               "ignored; --layers other than the checkpoint's is refused)", group="shape"),
        *TRANSFORMER_KNOBS,
        Option("lr", float, 3e-4, "AdamW learning rate", min=0, max=10, when=(("mode", ("train",)),), group="knobs"),
        ROPE_THETA,
        Option("save-checkpoint", str, "", "after the run, write the trained weights to this new directory as a "
               "Hugging Face checkpoint (loadable by transformers)", when=(("mode", ("train",)),)),
        Option("dry-run", bool, False, "print the plan as JSON (config, parameters, FLOPs, memory) and exit"),
        Option("data", str, "", "train on a token file (.npy, .bin, integers as text): batches of --seq-len + 1 "
               "contiguous tokens at offsets drawn by --seed (empty: random tokens)", when=(("mode", ("train",)),),
               group="data"),
        Option("data-format", str, "auto", "how to read --data (auto: .npy, .bin by suffix, else integers as text)",
               ("auto", "npy", "bin", "ints"), when=(("mode", ("train",)),), group="data"),
        Option("data-dtype", str, "uint16", "the ids' type in a raw .bin file", BIN_DTYPES,
               when=(("mode", ("train",)),), group="data"),
    ),
    checks=dense_checks,
    preset_values=preset_values,
)
