"""How one forward call attends: ``Attend`` objects, one per layer, and the preallocated KV cache that makes them.

A block calls its ``attend(q, k, v)`` with the call's queries, keys and values [B, heads, T, D] and gets the
attention output [B, H, T, D]. Without a cache (training, a full forward) that is the model's kernel under the
call's mask (``KernelAttend``); with one it first writes the keys and values at the call's positions and attends
every position up to them (``CacheAttend`` here: every row at the same positions, gpt-fast style; the serving
engine's slot cache has its own, with one position per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from workloads.models.attention import AttentionKernel, Mask
from workloads.models.config import ModelConfig


class Attend(Protocol):
    """One layer's attention for one forward call."""

    #: whether the call writes a KV cache (activation checkpointing recomputes only calls that do not)
    writes_cache: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Cache(Protocol):
    """Where a forward call's keys and values go: one ``Attend`` per layer for tokens at ``positions``."""

    def attends(self, kernel: AttentionKernel, positions: int | torch.Tensor, t: int) -> Sequence[Attend]: ...


class KernelAttend:
    """The model's kernel under one mask, no cache (shared by every layer of a call)."""

    writes_cache = False

    def __init__(self, kernel: AttentionKernel, mask: Mask) -> None:
        self.kernel, self.mask = kernel, mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.kernel(q, k, v, self.mask)


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


class CacheAttend:
    """One layer through a KV cache, every row at positions start..start+T-1: write, then the kernel over
    positions 0..start+T-1 under ``mask``."""

    writes_cache = True

    def __init__(self, cache: LayerKVCache, start: int, kernel: AttentionKernel, mask: Mask) -> None:
        self.cache, self.start, self.kernel, self.mask = cache, start, kernel, mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.update(self.start, k, v, self.kernel.kv_multiple)
        return self.kernel(q, kc, vc, self.mask)


def cache_attends(layers: Sequence[LayerKVCache], kernel: AttentionKernel, start: int, t: int,
                  device: torch.device) -> list[CacheAttend]:
    """Each layer's ``CacheAttend`` for ``t`` tokens at ``start`` (one mask for all)."""
    mask = kernel.mask(t, start + t, device)
    return [CacheAttend(c, start, kernel, mask) for c in layers]


class KVCache:
    """One LayerKVCache per layer, allocated once for ``batch`` sequences of up to ``max_len`` tokens; every
    sequence at the same position (a ``Cache`` for int positions)."""

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

    def attends(self, kernel: AttentionKernel, positions: int | torch.Tensor, t: int) -> list[CacheAttend]:
        if not isinstance(positions, int):
            raise TypeError("KVCache takes one start position for every row (an int)")
        return cache_attends(self.layers, kernel, positions, t, self.layers[0].k.device)

    def nbytes(self) -> int:
        """Bytes held by every layer's keys and values."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
