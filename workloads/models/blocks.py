"""Transformer blocks: attention, MLP (SwiGLU or GELU) and the pre-norm residual block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models import boundaries
from workloads.models.config import ModelConfig
from workloads.models.kv_cache import Attend
from workloads.models.norms import make_norm
from workloads.models.projections import QKVLayout, gate_up_block, split_gate_up
from workloads.models.rope import Rope, rotate


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention: one fused q/k/v projection (``wqkv``, laid out as
    ``projections.QKVLayout`` says), RoPE, the call's ``Attend`` (a kernel, or a KV cache and a kernel), the output
    projection ``wo``. q, k, v carry biases under the gpt arch or ``qkv_bias`` (Qwen2). An ``Attend`` with a
    ``rotate_and_attend(qkv, rope, layout)`` takes the fused output unrotated and does RoPE, its cache write and
    attention itself (the engine's decode on a GPU: one kernel)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layout = QKVLayout(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        d, qkv_bias = cfg.d_model, cfg.bias or cfg.qkv_bias
        self.wqkv = nn.Linear(d, self.layout.rows, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: Rope | None, attend: Attend) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.wqkv(x)
        whole = getattr(attend, "rotate_and_attend", None)
        if whole is not None and rope is not None:  # the engine's GPU decode: rotation, cache write, attention in one
            return self.wo(whole(qkv, rope, self.layout).reshape(b, t, -1))
        q, k, v = self.layout.split(qkv)  # [b, t, heads, hd]
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU (llama: w2(silu(gate x) * up x), gate and up one fused projection ``w13``, rows interleaved in blocks
    as ``projections.split_gate_up`` reads them) or GELU (gpt: w2(gelu(w1 x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.arch == "llama"
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.bias) if self.gated else None
        self.block = gate_up_block(cfg.d_ff)
        self.w1 = None if self.gated else nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def inputs(self) -> list[nn.Linear]:
        """The projections that read the block's input (initialised at the input std)."""
        return [m for m in (self.w13, self.w1) if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            y = self.w13(x)
            if boundaries.usable(y):  # GPU inference: written once, not recomputed by the down projection
                return self.w2(boundaries.swiglu(y, self.block))
            gate, up = split_gate_up(y, self.block)
            return self.w2(F.silu(gate) * up)
        assert self.w1 is not None
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = make_norm(cfg.arch, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg.arch, cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope | None, attend: Attend) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attend)
        return x + self.mlp(self.mlp_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) for input projections, Normal(0, out_std) for residual outputs, zero biases."""
        for norm in (self.attn_norm, self.mlp_norm):
            norm.reset_parameters()
        for lin in (self.attn.wqkv, *self.mlp.inputs()):
            _init_linear(lin, std)
        for lin in (self.attn.wo, self.mlp.w2):
            _init_linear(lin, out_std)


def _init_linear(lin: nn.Linear, std: float) -> None:
    nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def residual_std(std: float, n_layers: int) -> float:
    """Output-projection std scaled by depth (GPT-2 / nanoGPT): std / sqrt(2 L)."""
    return std / math.sqrt(2 * n_layers)
