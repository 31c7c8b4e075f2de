"""MoE FFN (router, routed experts, shared experts, capacity), the MoE block and the MoE transformer.

Attention, norms, RoPE, the dense blocks and the embedding/head skeleton come from the dense model
(``blocks``, ``transformer``); only the FFN of the last ``n_moe_layers`` layers changes.

Each MoE FFN returns its output, its balance loss (Switch: E · Σ_i f_i · P_i, with f_i the fraction of
the step's assignments routed to expert i and P_i the mean routing probability; 1.0 when balanced)
and a detached stats row ``[counts (E), dropped, router entropy sum, balance loss, tokens]`` that the
driver accumulates on the device (see ``moe_stats``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from workloads.models.attention import AttentionKernel
from workloads.models.blocks import MLP, Attention, Block, _init_linear
from workloads.models.kv_cache import Attend, Cache
from workloads.models.moe_config import MoEConfig
from workloads.models.moe_experts import RoutedExperts, expert_counts
from workloads.models.moe_router import Router
from workloads.models.norms import make_norm
from workloads.models.rope import Rope
from workloads.models.transformer import Transformer

STATS_EXTRA = 4  # dropped, router entropy sum, balance loss, tokens


def capacity_keep(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments [N, k] fit in ``capacity`` per expert, earlier tokens first."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = expert_counts(flat, n_experts)
    starts = counts.cumsum(0) - counts
    pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
    return (pos < capacity).view_as(indices)


class MoEFFN(nn.Module):
    """Router, routed experts, optional shared experts; ``collect_stats`` and ``need_aux`` are attributes."""

    def __init__(self, cfg: MoEConfig, impl: str = "grouped", gemm: str = "bmm") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.base.d_model
        self.router = Router(d, cfg.n_experts, cfg.top_k, cfg.router, cfg.route_scale, cfg.normalize_top1)
        self.experts = RoutedExperts(cfg.n_experts, d, cfg.expert_d_ff, impl, gemm)
        shared = replace(cfg.base, d_ff=cfg.n_shared * cfg.expert_d_ff)
        self.shared = MLP(shared) if cfg.n_shared else None
        self.collect_stats = True
        self.need_aux = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y [B, T, d], balance loss (scalar, differentiable through P), stats row [E + 4])."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n, n_exp, k = flat.shape[0], self.cfg.n_experts, self.cfg.top_k
        r = self.router(flat)
        counts = expert_counts(r.indices, n_exp).float()
        indices, dropped = r.indices, counts.new_zeros(1)
        cap = self.cfg.capacity(n)
        if cap is not None:
            keep = capacity_keep(r.indices, n_exp, cap)
            indices = torch.where(keep, r.indices, n_exp)
            dropped = (~keep).sum().float().view(1)
        y = self.experts(flat, indices, r.gates, dropping=cap is not None)
        if self.shared is not None:
            y = y + self.shared(flat)
        zero = counts.new_zeros(1)
        aux = n_exp * (counts / (n * k) * r.probs.mean(0)).sum() if self.need_aux or self.collect_stats else zero[0]
        ent = zero
        if self.collect_stats:
            p = r.probs
            ent = (-(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(n_exp)).sum().view(1) if n_exp > 1 else zero
        stats = torch.cat([counts, dropped, ent.detach(), aux.detach().view(1), counts.new_full((1,), n)])
        return y.view(shape), aux, stats

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            for lin in self.shared.inputs():
                _init_linear(lin, std)
            _init_linear(self.shared.w2, out_std)


class MoEBlock(nn.Module):
    """Pre-norm residual block with the dense model's attention and an MoE FFN."""

    def __init__(self, cfg: MoEConfig, layer_id: int, impl: str = "grouped", gemm: str = "bmm") -> None:
        super().__init__()
        self.layer_id = layer_id
        base = cfg.base
        self.attn_norm = make_norm(base.arch, base.d_model, base.norm_eps)
        self.attn = Attention(base)
        self.mlp_norm = make_norm(base.arch, base.d_model, base.norm_eps)
        self.moe = MoEFFN(cfg, impl, gemm)

    def forward(self, x: torch.Tensor, rope: Rope | None,
                attend: Attend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), rope, attend)
        y, aux, stats = self.moe(self.mlp_norm(x))
        return x + y, aux, stats

    def init_weights(self, std: float, out_std: float) -> None:
        for norm in (self.attn_norm, self.mlp_norm):
            norm.reset_parameters()
        _init_linear(self.attn.wqkv, std)
        _init_linear(self.attn.wo, out_std)
        self.moe.init_weights(std, out_std)


class MoEOutput(NamedTuple):
    """Logits [B, T, V], the summed balance loss of the MoE layers, and their stats [n_moe_layers, E + 4]."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: torch.Tensor


class MoETransformer(Transformer):
    """The dense Transformer's embedding, norm and head around dense blocks then MoE blocks.

    ``impl`` (loop or grouped) and ``gemm`` (grouped_mm or bmm) pick the routed-expert implementation.
    ``forward`` takes an optional KV cache (``workloads.models.kv_cache.KVCache`` of ``cfg.base``), as the
    dense model does: a prefill, then one token per sequence per decode step.
    """

    def __init__(self, cfg: MoEConfig, attention: AttentionKernel | None = None, impl: str = "grouped",
                 gemm: str = "bmm") -> None:
        cfg.validate()
        # The dense skeleton with only the leading dense blocks (at least one, dropped if none are dense).
        n_dense = cfg.n_dense_layers
        super().__init__(cfg.base.with_layers(max(n_dense, 1)), attention)
        self.cfg = cfg.base
        self.moe_cfg = cfg
        dense = list(self.layers)[:n_dense]
        moe = [MoEBlock(cfg, i, impl, gemm) for i in cfg.moe_layer_ids]
        self.layers = nn.ModuleList([*dense, *moe])
        self.init_weights()

    @property
    def moe_layers(self) -> list[MoEFFN]:
        return [layer.moe for layer in self.layers if isinstance(layer, MoEBlock)]

    def finish_load(self) -> None:
        """After the parameters were filled in place (``workloads.checkpoint.load``): the dense model's tie and
        RoPE table, and the routers' selection biases at zero (a checkpoint has none)."""
        super().finish_load()
        for m in self.moe_layers:
            m.router.bias.zero_()

    def set_capacity(self, factor: float | None) -> None:
        """Every MoE layer's capacity factor (None: drop no token), as ``MoEConfig.capacity_factor``."""
        self.moe_cfg = replace(self.moe_cfg, capacity_factor=factor).validate()
        for m in self.moe_layers:
            m.cfg = self.moe_cfg

    def set_experts(self, impl: str | None = None, gemm: str | None = None) -> None:
        """Switch every MoE layer's expert implementation and/or grouped GEMM."""
        for m in self.moe_layers:
            m.experts.impl = impl or m.experts.impl
            m.experts.gemm = gemm or m.experts.gemm

    def set_collect(self, stats: bool, aux: bool) -> None:
        """Whether MoE layers compute router entropy (``stats``) and the balance loss (``aux``)."""
        for m in self.moe_layers:
            m.collect_stats, m.need_aux = stats, aux

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None,  # type: ignore[override]
                positions: int | torch.Tensor | None = None) -> MoEOutput:
        """Logits for tokens [B, T] (causal), with the MoE balance loss and stats; ``cache`` and ``positions`` as
        in the dense ``Transformer.forward``."""
        t = tokens.shape[1]
        pos = self.positions_checked(cache, positions, t)
        h, rope = self.embed(tokens, pos)
        auxes, stats = [], []
        for layer, attend in zip(self.layers, self.attends(cache, pos, t, tokens.device), strict=True):
            out = layer(h, rope, attend)
            if isinstance(layer, Block):
                h = out
            else:
                h, aux, st = out
                auxes.append(aux)
                stats.append(st)
        return MoEOutput(self.output(self.norm(h)), torch.stack(auxes).sum(), torch.stack(stats))
