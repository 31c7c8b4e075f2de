"""Transformer blocks: attention, MLP (SwiGLU or GELU) and the pre-norm residual block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models.attention import AttentionKernel, Mask
from workloads.models.config import ModelConfig
from workloads.models.kv_cache import LayerKVCache
from workloads.models.norms import make_norm
from workloads.models.rope import apply_rope


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with separate q, k, v, o projections (TP-friendly); q, k, v carry
    biases under the gpt arch or ``qkv_bias`` (Qwen2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd, qkv_bias = cfg.d_model, cfg.head_dim, cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=qkv_bias)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        mask: Mask,
        kernel: AttentionKernel,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v, kernel.kv_multiple)
        y = kernel(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU (llama: w2(silu(w1 x) * w3 x)) or GELU (gpt: w2(gelu(w1 x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.arch == "llama"
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if self.gated else None
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
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

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        mask: Mask,
        kernel: AttentionKernel,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, kernel, cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) for input projections, Normal(0, out_std) for residual outputs, zero biases."""
        for norm in (self.attn_norm, self.mlp_norm):
            norm.reset_parameters()
        for lin in (self.attn.wq, self.attn.wk, self.attn.wv, self.mlp.w1, self.mlp.w3):
            if lin is not None:
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
