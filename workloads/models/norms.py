"""Normalisation layers: RMSNorm (llama) and LayerNorm (gpt), both computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models import boundaries


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim: statistics in float32, output in x's dtype, times ``weight`` (GPU
    inference: ``boundaries``' kernel, which rounds the same way)."""
    if boundaries.norm_usable(x, weight):
        return boundaries.rms_norm(x, weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(arch: str, dim: int, eps: float) -> nn.Module:
    """RMSNorm for llama, LayerNorm (with bias) for gpt."""
    return RMSNorm(dim, eps) if arch == "llama" else nn.LayerNorm(dim, eps=eps)
