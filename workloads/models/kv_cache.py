"""Preallocated KV cache: per layer, keys and values of shape [B, n_kv_heads, max_len, head_dim].

Every sequence in the batch sits at the same position; the caller passes ``start_pos`` (gpt-fast style)
and the cache holds no position state of its own.
"""

from __future__ import annotations

import torch

from workloads.models.config import ModelConfig


class LayerKVCache:
    """Keys and values of one layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor, multiple: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at positions start_pos..start_pos+T-1; return views of positions 0..end-1.

        With ``multiple`` > 1 the views extend to the next multiple of it (within the buffer); the extra
        positions hold stale values the attention mask must hide.
        """
        max_len = self.k.shape[2]
        end = start_pos + k.shape[2]
        if end > max_len:
            raise ValueError(f"KV cache holds {max_len} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        stop = min(-(-end // multiple) * multiple, max_len)
        return self.k[:, :, :stop], self.v[:, :, :stop]


class KVCache:
    """One LayerKVCache per layer, allocated once for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {self.max_len} exceeds max_seq_len {cfg.max_seq_len}")
        shape = (batch, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.layers = [
            LayerKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layers)
        ]

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def nbytes(self) -> int:
        """Bytes held by every layer's keys and values."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
