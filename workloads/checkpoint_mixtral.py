"""Mixtral checkpoints (``model_type: mixtral``) into btune's MoE model, and back: the ``mixtral`` Family of
``workloads.checkpoint`` (importing this module registers it; ``workloads.checkpoint`` imports it).

Mixtral is Mistral's attention (GQA, RoPE, an optional sliding window) with every layer's MLP replaced by
``num_local_experts`` SwiGLU experts, ``num_experts_per_tok`` of them per token: a linear gate, softmax over all
experts, the top k, their probabilities renormalised to sum to 1 (at every k, top-1 included). btune's
``MoETransformer`` computes exactly that with every layer an MoE layer, no shared experts, the softmax router,
``route_scale`` 1, ``normalize_top1`` and no capacity (no token dropped). ``router_jitter_noise`` (training only)
and the router's auxiliary-loss settings are not weights and are not read.

Tensor names are the checkpoint format ``save_pretrained`` writes and the published Mixtral checkpoints use:
``model.layers.N.block_sparse_moe.gate.weight`` and one ``w1``/``w3``/``w2`` per expert
(``...block_sparse_moe.experts.E.w1.weight``), which fill slices of btune's stacked expert weights (``w13``
[E, 2F, d]: w1 then w3, the order in which the routed experts' SwiGLU chunks them, not the dense MLP's
interleaved gate/up; ``w2`` [E, d, F]).
transformers 5's fused in-memory layout (``mlp.experts.gate_up_proj``, written only with
``save_pretrained(save_original_format=False)``) is not read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from workloads.checkpoint import (
    FAMILIES,
    Family,
    Target,
    _hf_llama_like,
    _llama_like,
    _need,
    llama_names,
)
from workloads.checkpoint_files import CheckpointError
from workloads.models.attention import AttentionKernel
from workloads.models.moe_config import MoEConfig


def mixtral_config(d: dict) -> MoEConfig:
    """The btune MoE config of a Mixtral config.json: every layer MoE, softmax top-k renormalised, no capacity."""
    experts = int(_need(d, "num_local_experts", "mixtral"))
    top_k = int(_need(d, "num_experts_per_tok", "mixtral"))
    base = _llama_like(d, "mixtral", window=d.get("sliding_window"))
    cfg = MoEConfig(base, experts, top_k, base.d_ff, n_shared=0, n_moe_layers=base.n_layers, router="softmax",
                    route_scale=1.0, capacity_factor=None, normalize_top1=True)
    try:
        return cfg.validate()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def mixtral_to_hf(cfg: MoEConfig) -> dict:
    """The config.json of a btune MoE config that Mixtral can hold (CheckpointError for one it cannot)."""
    why = [what for what, bad in (
        ("dense layers", cfg.n_moe_layers != cfg.n_layers), ("shared experts", cfg.n_shared > 0),
        (f"the {cfg.router} router", cfg.router != "softmax"),
        (f"route_scale {cfg.route_scale:g}", cfg.route_scale != 1),
        ("an un-normalised top-1 gate", cfg.top_k == 1 and not cfg.normalize_top1),
        ("q/k/v biases", cfg.base.qkv_bias), ("RoPE scaling", cfg.base.rope_scaling is not None),
        (f"the {cfg.base.arch} arch", cfg.base.arch != "llama")) if bad]
    if why:
        raise CheckpointError(f"{cfg.name}: a Mixtral checkpoint cannot hold {', '.join(why)}")
    out = _hf_llama_like(replace(cfg.base, d_ff=cfg.expert_d_ff), "mixtral", "MixtralForCausalLM")
    out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, sliding_window=cfg.base.sliding_window,
               router_jitter_noise=0.0)
    return out


def mixtral_names(cfg: MoEConfig) -> dict[str, Target]:
    """Mixtral tensor names: Llama's attention, norms, embedding and head; per-expert w1/w3 into slices of btune's
    ``w13``, w2 into ``w2``, the gate into the router's weight."""
    f = cfg.expert_d_ff
    out = {hf: bt for hf, bt in llama_names(cfg.base).items() if ".mlp." not in hf}
    for i in range(cfg.n_layers):
        hf, bt = f"model.layers.{i}.block_sparse_moe.", f"layers.{i}.moe."
        out[hf + "gate.weight"] = bt + "router.weight"
        for e in range(cfg.n_experts):
            out[f"{hf}experts.{e}.w1.weight"] = ("index", bt + "experts.w13", (e, slice(0, f)))
            out[f"{hf}experts.{e}.w3.weight"] = ("index", bt + "experts.w13", (e, slice(f, 2 * f)))
            out[f"{hf}experts.{e}.w2.weight"] = ("index", bt + "experts.w2", e)
    return out


def build_moe(cfg: MoEConfig, attention: AttentionKernel | None = None, **kw: Any) -> nn.Module:
    """btune's MoETransformer for ``cfg`` (``kw``: its ``impl`` and ``gemm``)."""
    from workloads.models.moe import MoETransformer

    return MoETransformer(cfg, attention, **kw)


MIXTRAL = Family("mixtral", mixtral_config, mixtral_names, build_moe, mixtral_to_hf)
FAMILIES[MIXTRAL.model_type] = MIXTRAL
