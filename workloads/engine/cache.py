"""The serving KV cache: per layer, keys and values [max_batch, kv_heads, positions, head_dim], one row per slot.

Preallocated and fixed in shape and address, so decode steps keep static shapes (CUDA graphs). Column ``cache_len``
is scratch: decode steps write the keys of idle slots there, and no query ever attends it. ``positions``
is ``cache_len + spare`` (spare >= 1: the scratch column, and room for padded prefill chunks) rounded up
to ``multiple`` (aligned masks; whole FlexAttention blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from workloads.models.kv_cache import LayerKVCache


class SlotKVCache(nn.Module):
    """Keys and values of every layer for ``max_batch`` slots of up to ``cache_len`` tokens each."""

    def __init__(self, n_layers: int, max_batch: int, kv_heads: int, cache_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 multiple: int = 64, spare: int = 1) -> None:
        super().__init__()
        self.cache_len = cache_len
        self.positions = -(-(cache_len + max(spare, 1)) // multiple) * multiple
        shape = (max_batch, kv_heads, self.positions, head_dim)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(n_layers):
            k = torch.zeros(shape, device=device, dtype=dtype)
            v = torch.zeros(shape, device=device, dtype=dtype)
            self.register_buffer(f"k{i}", k, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)
            self.k.append(k)
            self.v.append(v)

    @property
    def scratch(self) -> int:
        """The column idle slots write to."""
        return self.cache_len

    def slot(self, layer: int, slot: int) -> LayerKVCache:
        """One slot of one layer as a batch-1 cache (views: writes land in this cache)."""
        return LayerKVCache(self.k[layer][slot:slot + 1], self.v[layer][slot:slot + 1])

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))
