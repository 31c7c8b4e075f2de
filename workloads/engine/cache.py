"""The serving KV cache: per layer, keys and values [max_batch, kv_heads, positions, head_dim], one row per slot.

Preallocated and fixed in shape and address, so decode steps keep static shapes (CUDA graphs). Column ``cache_len``
is scratch: decode steps write the keys of idle slots there, and no query ever attends it. ``positions``
is ``cache_len + spare`` (spare >= 1: the scratch column, and room for padded prefill chunks) rounded up
to ``multiple`` (aligned masks; whole FlexAttention blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workloads.models.attention import AttentionKernel
from workloads.models.kv_cache import Attend, LayerKVCache, cache_attends


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

    def prefill(self, slot: int, wrap: Callable[[Attend], Attend] | None = None) -> SlotPrefill:
        """One slot as the cache of a prefill chunk (a ``kv_cache.Cache`` for an int start); ``wrap`` wraps each
        layer's attention (the engine keeps it out of its compiled blocks)."""
        return SlotPrefill(self, slot, wrap)

    def prefill_rows(self, slots: torch.Tensor, wrap: Callable[[Attend], Attend] | None = None) -> RowsPrefill:
        """Several slots as the cache of one prefill call, a row each, every row's chunk at the same start and
        length (``slots`` [k] on the cache's device)."""
        return RowsPrefill(self, slots, wrap)


class SlotPrefill:
    """A slot of a ``SlotKVCache`` as a batch-1 cache: each layer writes the chunk at its positions and attends
    positions 0..start+n-1 with the model's kernel and mask."""

    def __init__(self, cache: SlotKVCache, slot: int, wrap: Callable[[Attend], Attend] | None = None) -> None:
        self.cache, self.slot, self.wrap = cache, slot, wrap

    def attends(self, kernel: AttentionKernel, positions: int | torch.Tensor, t: int) -> list[Attend]:
        if not isinstance(positions, int):
            raise TypeError("a prefill chunk starts at one position (an int)")
        layers = [self.cache.slot(i, self.slot) for i in range(len(self.cache.k))]
        out: list[Attend] = list(cache_attends(layers, kernel, positions, t, self.cache.k[0].device))
        return out if self.wrap is None else [self.wrap(a) for a in out]


class RowsAttend:
    """One layer of a prefill call over several slots at one start: write each row's keys and values into its
    slot, then the kernel over each slot's positions 0..start+n-1 (gathered: a copy of those rows)."""

    writes_cache = True

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, start: int, kernel: AttentionKernel,
                 mask: Any) -> None:
        self.k, self.v, self.slots, self.start, self.kernel, self.mask = k, v, slots, start, kernel, mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[self.slots, :, self.start:end] = k
        self.v[self.slots, :, self.start:end] = v
        multiple = self.kernel.kv_multiple
        stop = min(-(-end // multiple) * multiple, self.k.shape[2])
        return self.kernel(q, self.k[self.slots, :, :stop], self.v[self.slots, :, :stop], self.mask)


class RowsPrefill:
    """Slots of a ``SlotKVCache`` as the cache of one prefill call (a ``kv_cache.Cache`` for an int start)."""

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor,
                 wrap: Callable[[Attend], Attend] | None = None) -> None:
        self.cache, self.slots, self.wrap = cache, slots, wrap

    def attends(self, kernel: AttentionKernel, positions: int | torch.Tensor, t: int) -> list[Attend]:
        if not isinstance(positions, int):
            raise TypeError("a prefill call's rows start at one position (an int)")
        mask = kernel.mask(t, positions + t, self.cache.k[0].device)
        out: list[Attend] = [RowsAttend(k, v, self.slots, positions, kernel, mask)
                             for k, v in zip(self.cache.k, self.cache.v, strict=True)]
        return out if self.wrap is None else [self.wrap(a) for a in out]
