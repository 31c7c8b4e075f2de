"""The engine's forward passes, built from the model's own modules (embeddings, blocks, norm, head, RoPE).

``prefill_chunk``: a run of prompt tokens of one slot, at positions start..start+n-1, through the
model's blocks with a batch-1 view of that slot's cache (the model's attention kernel and masks).

``DecodeStep``: one token for each of slots 0..b-1, each at its own position (sequences of different
lengths in one batch). Keys and values are written at ``write_pos`` (the scratch column for idle slots);
each slot attends its cache up to its position through a length mask. SDPA runs on grouped queries (the
query heads of one KV head stacked as queries), so GQA needs no copy of the cache; ``flex`` runs
FlexAttention with a block mask whose mask function reads the slots' positions.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from workloads.engine.cache import SlotKVCache
from workloads.models.attention import AttentionKernel
from workloads.models.transformer import Transformer

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
FLEX_BLOCK = 128
_flex_compiled = torch.compile(flex_attention, dynamic=False)  # flex must run compiled; compiled once lazily


def prefill_chunk(model: Transformer, kernel: AttentionKernel, cache: SlotKVCache, slot: int, tokens: torch.Tensor,
                  start: int, last: int) -> torch.Tensor:
    """Write tokens [1, n] of ``slot`` into the cache at start.. and return the greedy token after index ``last``."""
    n = tokens.shape[1]
    end = start + n
    h = model.tok_embeddings(tokens)
    if model.pos_embeddings is not None:
        h = h + model.pos_embeddings.weight[start:end]
    rope = model.rope[:, start:end] if model.rope is not None else None
    mask = kernel.mask(n, end, tokens.device)
    for i, layer in enumerate(model.layers):
        h = layer(h, rope, mask, kernel, cache.slot(i, slot), start)
    return model.output(model.norm(h[:, last])).argmax(-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, D] by per-row tables [b, 1, D] (rotate-half layout, as workloads.models.rope)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class DecodeStep(nn.Module):
    """Greedy next tokens [b] for tokens, pos, write_pos [b] (slots 0..b-1); see the module docstring."""

    def __init__(self, model: Transformer, cache: SlotKVCache, backend: str = "auto", window: int | None = None,
                 ) -> None:
        super().__init__()
        self.model, self.cache = model, cache
        self.backend, self.window = backend, window
        self.head_dim = model.cfg.head_dim
        n = cache.k[0].shape[0]
        self.register_buffer("rows", torch.arange(n, device=cache.k[0].device), persistent=False)
        self.register_buffer("keys", torch.arange(cache.positions, device=cache.k[0].device), persistent=False)
        # flex: the slots' positions, read by the block mask's mask function at run time
        self.register_buffer("flex_pos", torch.zeros(n, dtype=torch.long, device=cache.k[0].device),
                             persistent=False)
        self._block_masks: dict[int, BlockMask] = {}

    def block_mask(self, b: int) -> BlockMask:
        """A block mask for b slots that leaves every block partial, so the mask function decides per key."""
        if b not in self._block_masks:
            dev = self.rows.device
            nblocks = self.cache.positions // FLEX_BLOCK
            num = torch.full((b, 1, 1), nblocks, dtype=torch.int32, device=dev)
            idx = torch.arange(nblocks, dtype=torch.int32, device=dev).expand(b, 1, 1, nblocks).contiguous()
            pos, window = self.flex_pos, self.window

            def mask_mod(bi: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
                p = pos[bi]
                allowed = kv <= p
                return allowed & (p - kv < window) if window is not None else allowed

            self._block_masks[b] = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                                            seq_lengths=(1, self.cache.positions))
        return self._block_masks[b]

    def _mask(self, pos: torch.Tensor) -> torch.Tensor:
        keys = self.keys[None, :]
        p = pos[:, None]
        allowed = keys <= p
        if self.window is not None:
            allowed = allowed & (p - keys < self.window)
        return allowed

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                block_mask: BlockMask | None) -> torch.Tensor:
        """q [b, H, D] against k, v [b, Hkv, P, D]; returns [b, H * D]."""
        b, h, d = q.shape
        hkv = k.shape[1]
        if block_mask is not None:
            y = _flex_compiled(q[:, :, None], k, v, block_mask=block_mask, enable_gqa=h != hkv)
            return y.reshape(b, h * d)
        qg = q.view(b, hkv, h // hkv, d)  # query head j uses KV head j // (h / hkv), as repeat_interleave
        ctx = sdpa_kernel(_SDPA[self.backend]) if self.backend in _SDPA else nullcontext()
        with ctx:
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :])
        return y.reshape(b, h * d)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, write_pos: torch.Tensor,
                block_mask: BlockMask | None = None) -> torch.Tensor:
        m = self.model
        b = tokens.shape[0]
        h = m.tok_embeddings(tokens)
        if m.pos_embeddings is not None:
            h = h + m.pos_embeddings(pos)
        if m.rope is not None:
            cos, sin = m.rope[0][pos][:, None, :], m.rope[1][pos][:, None, :]
        if block_mask is not None:
            self.flex_pos[:b].copy_(pos)
        mask = self._mask(pos) if block_mask is None else None
        rows = self.rows[:b]
        for i, layer in enumerate(m.layers):
            attn = layer.attn
            x = layer.attn_norm(h)
            q = attn.wq(x).view(b, -1, self.head_dim)
            k = attn.wk(x).view(b, -1, self.head_dim)
            v = attn.wv(x).view(b, -1, self.head_dim)
            if m.rope is not None:
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc[rows, :, write_pos] = k
            vc[rows, :, write_pos] = v
            h = h + attn.wo(self._attend(q, kc[:b], vc[:b], mask, block_mask))
            h = h + layer.mlp(layer.mlp_norm(h))
        return m.output(m.norm(h)).argmax(-1)
