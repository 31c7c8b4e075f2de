"""Rotary position embedding, "rotate half" layout (the Hugging Face Llama weight layout), with Llama 3.x
frequency scaling when a config carries it (checkpoints; the presets have none and stop at 8192 tokens).
"""

from __future__ import annotations

import math

import torch

from workloads.models.config import RopeScaling


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Inverse frequencies under Llama 3.x scaling, as Hugging Face's ``rope_type: llama3`` computes them."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
                scaling: RopeScaling | None = None) -> torch.Tensor:
    """cos and sin tables stacked as a float32 tensor [2, max_seq_len, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by ``cos`` and ``sin`` tables already shaped to broadcast against it; in float32, returned in
    x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).type_as(x)


#: cos and sin shaped to broadcast against q or k [B, T, H, D]: each [B or 1, T, 1, D]
Rope = tuple[torch.Tensor, torch.Tensor]


def rope_at(table: torch.Tensor, positions: int | torch.Tensor, t: int) -> Rope:
    """cos and sin of ``table`` [2, max_len, D] at ``positions``: an int (every row at positions..positions+t-1)
    or a tensor [B, t] (each row's own positions)."""
    if isinstance(positions, int):
        part = table[:, positions:positions + t]
        return part[0][None, :, None, :], part[1][None, :, None, :]
    return table[0][positions][:, :, None, :], table[1][positions][:, :, None, :]
