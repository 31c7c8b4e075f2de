"""Mixture-of-Experts configurations: a frozen dataclass around a dense ModelConfig, and named presets.

Torch-free on purpose: the CLI checks options and prints plans without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from math import ceil
from typing import Any

from workloads.models.config import ModelConfig

ROUTERS: tuple[str, ...] = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """A decoder whose last ``n_moe_layers`` layers have MoE FFNs (dense layers first, as DeepSeek does).

    ``base`` gives attention, norms, vocabulary and the dense layers' MLP width (``base.d_ff``); it must
    be a llama-arch config (RMSNorm, RoPE, SwiGLU). Each MoE FFN has ``n_experts`` routed SwiGLU experts
    of width ``expert_d_ff`` (``top_k`` per token) plus ``n_shared`` always-on experts of the same width
    (one SwiGLU of width ``n_shared * expert_d_ff``). ``router``: ``softmax`` (Mixtral) or ``sigmoid``
    scores (DeepSeek-V3); gates are the chosen scores normalised to sum to 1 (when ``top_k > 1``) times
    ``route_scale``. ``capacity_factor``: None keeps every token; else each expert takes at most
    ceil(factor · tokens · top_k / n_experts) assignments per step and drops the rest (later tokens first).
    """

    base: ModelConfig
    n_experts: int
    top_k: int
    expert_d_ff: int
    n_shared: int = 0
    n_moe_layers: int = 1
    router: str = "softmax"
    route_scale: float = 1.0
    capacity_factor: float | None = None
    normalize_top1: bool = False

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def description(self) -> str:
        """The preset's one-line description (kept on ``base``, next to the name)."""
        return self.base.description

    @property
    def model_type(self) -> str:
        """The Hugging Face ``model_type`` btune saves an MoE config as (``workloads.checkpoint_mixtral``)."""
        return "mixtral"

    @property
    def n_layers(self) -> int:
        return self.base.n_layers

    @property
    def n_dense_layers(self) -> int:
        return self.base.n_layers - self.n_moe_layers

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(range(self.n_dense_layers, self.base.n_layers))

    def with_layers(self, n: int) -> MoEConfig:
        """The first ``n`` layers, keeping the dense-first count but at least one MoE layer."""
        dense = min(self.n_dense_layers, n - 1)
        return replace(self, base=self.base.with_layers(n), n_moe_layers=n - dense)

    def capacity(self, tokens: int) -> int | None:
        """Assignments each expert may take in one forward of ``tokens`` tokens (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return ceil(self.capacity_factor * tokens * self.top_k / self.n_experts)

    def validate(self) -> MoEConfig:
        """Raise ValueError with a one-line reason if the shape is inconsistent; return self."""
        self.base.validate()
        name = self.name
        if self.base.arch != "llama":
            raise ValueError(f"{name}: MoE models use the llama arch (SwiGLU experts), got {self.base.arch!r}")
        if self.n_experts < 1 or self.expert_d_ff < 1:
            raise ValueError(f"{name}: n_experts and expert_d_ff must be positive")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"{name}: top-k {self.top_k} must be between 1 and the number of experts "
                             f"({self.n_experts})")
        if self.n_shared < 0:
            raise ValueError(f"{name}: the number of shared experts must be >= 0, got {self.n_shared}")
        if not 1 <= self.n_moe_layers <= self.base.n_layers:
            raise ValueError(f"{name}: {self.n_moe_layers} MoE layers do not fit in {self.base.n_layers} layers "
                             "(need 1..layers)")
        if self.router not in ROUTERS:
            raise ValueError(f"{name}: router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.route_scale <= 0:
            raise ValueError(f"{name}: route_scale must be positive")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity factor must be > 0, got {self.capacity_factor:g} "
                             "(leave it unset to drop no tokens)")
        return self


def _llama(name: str, layers: int, d: int, heads: int, kv: int, d_ff: int, vocab: int, seq: int,
           theta: float, eps: float = 1e-5, description: str = "") -> ModelConfig:
    return ModelConfig(name, "llama", layers, d, heads, kv, d_ff, vocab, seq, theta, eps, description=description)


MOE_PRESETS: dict[str, MoEConfig] = {
    c.name: c.validate()
    for c in (
        # CPU-sized: one dense layer, then two MoE layers of 8 fine-grained experts, top-2, sigmoid + bias.
        MoEConfig(_llama("tiny", 3, 64, 4, 2, 256, 512, 256, 10000.0,
                         description="CPU-sized MoE toy (3 layers: 1 dense, 2 MoE of 8 experts of width 64, top-2, "
                                     "1 shared, sigmoid router) for tests and smoke runs; not a real model"),
                  8, 2, 64, n_shared=1, n_moe_layers=2, router="sigmoid"),
        # The origin lab's "DeepSeek-R1 MoE" demo (64 experts, top-6) on DeepSeek-V3's widths; named for what it
        # is, since btune has no MLA or group-limited routing to build the real model with.
        MoEConfig(_llama("moe-64e-top6", 61, 7168, 128, 128, 18432, 129280, 4096, 10000.0, 1e-6,
                         description="DeepSeek-V3 widths (61 layers, 3 dense; d 7168; experts of 2048; vocab "
                                     "129280; sigmoid, scale 2.5) with 64 routed experts top-6, 2 shared, 128-head "
                                     "MHA, 184 B / 36 B active: not DeepSeek-R1/V3 (256 experts top-8, 1 shared, "
                                     "MLA, group-limited routing, 671 B / 37 B)"),
                  64, 6, 2048, n_shared=2, n_moe_layers=58, router="sigmoid", route_scale=2.5),
        MoEConfig(_llama("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768, 1e6,
                         description="Mixtral 8x7B's published shape (32 layers, d 4096, 32 heads, 8 KV, 8 experts "
                                     "of 14336 top-2, softmax router, vocab 32000, context 32768, 46.7 B / 12.9 B "
                                     "active)"),
                  8, 2, 14336, n_moe_layers=32),
        # The widely reported GPT-4 shape (16 experts, top-2); not a published configuration.
        MoEConfig(_llama("gpt4-style", 120, 12288, 96, 8, 49152, 100277, 8192, 500000.0,
                         description="The widely reported GPT-4 rumour (120 layers, d 12288, 16 experts of 24576 "
                                     "top-2, 1.78 T / 259 B active); not GPT-4, whose configuration is unpublished"),
                  16, 2, 24576, n_moe_layers=120),
    )
}


def resolve(opts: Mapping[str, Any]) -> MoEConfig:
    """The preset named in ``opts`` with the shape overrides applied and validated (ValueError: why not)."""
    cfg = MOE_PRESETS[opts.get("preset") or "tiny"]
    if opts.get("layers"):
        cfg = cfg.with_layers(int(opts["layers"]))
    changes: dict[str, Any] = {}
    for key, field in (("num_moe_layers", "n_moe_layers"), ("num_experts", "n_experts"), ("top_k", "top_k"),
                       ("num_shared_experts", "n_shared"), ("capacity_factor", "capacity_factor")):
        if opts.get(key) is not None:
            changes[field] = opts[key]
    if opts.get("router") not in (None, "auto"):
        changes["router"] = opts["router"]
    if changes.get("n_moe_layers") is not None and changes["n_moe_layers"] > cfg.n_layers:
        raise ValueError(f"--num-moe-layers {changes['n_moe_layers']} exceeds the model's {cfg.n_layers} layers")
    if changes.get("top_k") is not None and changes["top_k"] > changes.get("n_experts", cfg.n_experts):
        raise ValueError(f"--top-k {changes['top_k']} exceeds the number of routed experts "
                         f"({changes.get('n_experts', cfg.n_experts)})")
    if "n_experts" in changes and "top_k" not in changes and cfg.top_k > changes["n_experts"]:
        raise ValueError(f"--num-experts {changes['n_experts']} is fewer than the preset's top-k {cfg.top_k}; "
                         "set --top-k too")
    return replace(cfg, **changes).validate()
