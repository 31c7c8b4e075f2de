"""``btune serve-api``'s declaration (torch-free: the console parses and checks the options with it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workloads.checkpoint_files import layers_refusal
from workloads.options import COMMON_OPTIONS, Machine, Option, WorkloadSpec
from workloads.specs.dense import checkpoint_checks
from workloads.specs.serve import POSITION_ROOM, SERVE, SERVE_DEFAULTS, checkpoint_dims, position_room

#: The longest cache a default --max-seq-len gives (a preset's context can be 8192).
DEFAULT_CACHE_CAP = 4096


@dataclass(frozen=True)
class ServerSpec(WorkloadSpec):
    """A WorkloadSpec whose common options are only --preset, --seed and --device (a server has no steps)."""

    def all_options(self) -> tuple[Option, ...]:
        preset = Option("preset", str, self.default_preset, "named preset (random weights, seeded by --seed; "
                        "ignored with --checkpoint)", self.presets, group="shape")
        common = tuple(o for o in COMMON_OPTIONS if o.name in ("seed", "device"))
        return (preset, *common, *self.options)


def context(opts: Mapping[str, Any]) -> int | None:
    """The model's context: the checkpoint's (None when it cannot be read) or the preset's."""
    from workloads.models.config import PRESETS

    if opts.get("checkpoint"):
        dims = checkpoint_dims(opts)
        return None if dims is None else int(dims["context"])
    return PRESETS[str(opts.get("preset") or "tiny")].max_seq_len


def default_cache_len(ctx: int) -> int:
    """The longest cache whose rounding (``position_room``) stays within ``ctx`` positions, at most 4096 - 16."""
    return max(16, (min(ctx, DEFAULT_CACHE_CAP) // POSITION_ROOM) * POSITION_ROOM - 16)


def cache_len(opts: Mapping[str, Any]) -> int:
    """KV-cache positions per sequence: --max-seq-len, else the model's context less the cache's rounding."""
    if opts.get("max_seq_len"):
        return int(opts["max_seq_len"])
    ctx = context(opts)
    return default_cache_len(ctx if ctx is not None else 256)


def server_checks(opts: Mapping[str, Any], machine: Machine | None = None) -> list[tuple[str, str]]:
    """What the server cannot run as asked: an unreadable checkpoint, a cache past the model's context, --layers
    on a checkpoint, the flash kernel (no mask for a mixed-length decode batch)."""
    out = checkpoint_checks(opts)
    if out:
        return out
    if opts.get("attention_backend") == "flash":
        out.append(("attention-backend", "--attention-backend flash: the flash kernel takes no mask, and decoding "
                                         "sequences of different lengths in one batch needs one; use auto, "
                                         "efficient, cudnn, math or flex"))
    ctx = context(opts)
    n = cache_len(opts)
    dims = checkpoint_dims(opts)
    why = layers_refusal(opts.get("layers"), dims["layers"]) if dims is not None else None
    if why:
        out.append(("layers", why))
    if ctx is not None and position_room(n) > ctx:
        out.append(("max-seq-len", f"--max-seq-len {n}: the serving cache rounds up to {position_room(n)} "
                                   f"positions, more than the model's context of {ctx}; at most "
                                   f"{default_cache_len(ctx) if ctx >= POSITION_ROOM else 0}"))
    return out


def served_name(opts: Mapping[str, Any]) -> str:
    """--served-model-name, else the checkpoint directory's name, else the preset."""
    from pathlib import Path

    if opts.get("served_model_name"):
        return str(opts["served_model_name"])
    if opts.get("checkpoint"):
        return Path(str(opts["checkpoint"])).resolve().name
    return str(opts.get("preset") or "tiny")


def _serve_option(name: str) -> Option:
    return SERVE.option(name)


API_SERVER = ServerSpec(
    name="serve-api",
    module="workloads.api_server",
    description="btune's serving engine (continuous batching, chunked prefill, greedy decoding) behind an "
                "OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, streaming or not",
    presets=tuple(SERVE_DEFAULTS),
    default_preset="tiny",
    cpu_preset="tiny",
    options=(
        _serve_option("layers"),
        Option("checkpoint", str, "", "a Hugging Face checkpoint directory (config.json + safetensors: llama, "
               "mistral, qwen2, gpt2) served instead of random weights; its tokenizer.json, when present, "
               "turns text into tokens and back", group="shape"),
        Option("max-batch", int, 8, "KV-cache slots: sequences decoded together", min=1, max=4096, group="shape"),
        Option("max-seq-len", int, 0, "KV-cache positions per sequence, prompt plus output (0: the model's "
               "context less the cache's rounding, at most 4080)", min=0, max=1 << 20, group="shape"),
        _serve_option("max-prefill-tokens"),
        _serve_option("dtype"),
        _serve_option("attention-backend"),
        _serve_option("compile-mode"),
        Option("host", str, "127.0.0.1", "address to listen on (0.0.0.0: every interface)", group="run"),
        Option("port", int, 8000, "TCP port to listen on (0: a free one, printed in the ready line)", min=0,
               max=65535, group="run"),
        Option("served-model-name", str, "", "the model's name in the API (empty: the checkpoint directory's "
               "name, else the preset)", group="run"),
    ),
    checks=server_checks,
)
