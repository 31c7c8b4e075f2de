"""Rotary position embedding, "rotate half" layout (the Hugging Face Llama weight layout).

No Llama 3.1 long-context frequency scaling: presets stop at the native 8192-token context.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin tables stacked as a float32 tensor [2, max_seq_len, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
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


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, D] by ``table`` [2, T, D] (already sliced to the positions of x)."""
    return rotate(x, table[0][None, :, None, :], table[1][None, :, None, :])
