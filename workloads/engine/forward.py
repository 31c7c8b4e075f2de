"""The engine's forward passes: the model's own forward (``Transformer.hidden``) over the slot KV cache.

A prefill chunk is a run of prompt tokens of one slot at positions start..start+n-1: the model's forward with a
batch-1 view of that slot's cache (``SlotKVCache.prefill``: the model's attention kernel and masks).

A decode step (``DecodeStep``) is one token for each of slots 0..b-1, each at its own position (sequences of
different lengths in one batch): the model's forward with positions [b, 1] and a ``DecodeCache``. Keys and
values are written at ``write_pos`` (the scratch column for idle slots); each slot attends its cache up to its
position. Attention runs on grouped queries (the query heads of one KV head stacked as queries), so GQA needs
no copy of the cache. The step's ``mode``: ``split`` (``auto`` on a GPU) is the split-KV Triton kernels of
``decode_attention``, which read each slot's live keys only; ``flex`` (``--attention-backend flex``) is
FlexAttention's decoding kernel over a block mask built in the step from the slots' positions; ``dense`` is two
batched matmuls around a masked fp32 softmax (``auto`` on CPU), or SDPA with the forced kernel, over the whole
cache under a length mask.

``run_block`` (a block's call, compiled by the engine: one graph every layer shares) is how each block runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from workloads.engine import decode_attention
from workloads.engine.cache import SlotKVCache
from workloads.engine.decode_attention import decode_attention_rope, split_count
from workloads.engine.decode_attention import prepare as prepare_split
from workloads.models.attention import AttentionKernel, compiled_flex, visible
from workloads.models.kv_cache import Attend
from workloads.models.projections import QKVLayout
from workloads.models.transformer import RunBlock, Transformer

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
FLEX_BLOCK = 128
#: how a decode step attends: split-KV Triton kernels (decode_attention), FlexAttention, or matmuls / SDPA
DECODE_MODES = ("split", "flex", "dense")


def max_and_index(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, first index of the max) over the last dim of [b, V], in two stages where V splits in 256
    (a one-pass argmax over a 128k vocabulary is one thread block per row: tens of microseconds)."""
    b, v = logits.shape
    if v % 256 or v < 65536:
        return logits.max(-1)
    vals, idx = logits.view(b, 256, v // 256).max(-1)  # [b, 256]: each chunk's max and its first index
    chunk = vals.argmax(-1, keepdim=True)  # the first chunk holding the row's max
    return vals.gather(-1, chunk).squeeze(-1), (chunk * (v // 256) + idx.gather(-1, chunk)).squeeze(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [b, V] (the first index on ties)."""
    return max_and_index(logits)[1]


def next_tokens(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Greedy next tokens [b] from final hidden states [b, d] through the LM head, whole or sharded over the
    vocabulary (a head with a ``greedy`` method: workloads.engine.tensor_parallel)."""
    sharded = getattr(head, "greedy", None)
    return sharded(x) if sharded is not None else greedy(head(x))


class DecodeAttend:
    """One layer of a decode step: write each slot's key and value at its write position, then attend the slot's
    cache up to its position (module docstring). q [b, H, 1, D], k, v [b, Hkv, 1, D]; returns [b, H, 1, D]."""

    writes_cache = True

    def __init__(self, kc: torch.Tensor, vc: torch.Tensor, step: DecodeCache) -> None:
        self.kc, self.vc, self.step = kc, vc, step
        #: split mode: RoPE, the cache write and attention in one kernel (blocks.Attention calls it)
        self.rotate_and_attend = self._rotate_and_attend if step.mode == "split" and decode_attention.ROPE else None

    def _rotate_and_attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                           layout: QKVLayout) -> torch.Tensor:
        """[b, 1, H, D] from the fused q/k/v output [b, 1, rows], unrotated (decode_attention_rope)."""
        s = self.step
        assert s.counts is not None
        heads = layout.rep * self.kc.shape[1]  # this rank's query heads
        return decode_attention_rope(qkv, *rope, self.kc, self.vc, s.pos, s.write_pos, s.window, s.splits, s.counts,
                                     heads)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.step
        b, h, _, d = q.shape
        self.kc[s.rows, :, s.write_pos] = k[:, :, 0]
        self.vc[s.rows, :, s.write_pos] = v[:, :, 0]
        if s.mode == "split":
            assert s.counts is not None
            return decode_attention.decode_attention(q, self.kc, self.vc, s.pos, s.window, s.splits, s.counts)
        kc, vc = self.kc[:b], self.vc[:b]
        hkv = kc.shape[1]
        if s.block_mask is not None:
            return compiled_flex(True)(q, kc, vc, block_mask=s.block_mask, enable_gqa=h != hkv,
                                       kernel_options=s.flex_options or None)
        qg = q.view(b, hkv, h // hkv, d)  # query head j uses KV head j // (h / hkv), as repeat_interleave
        mask = s.mask
        assert mask is not None
        if s.backend in _SDPA:
            with sdpa_kernel(_SDPA[s.backend]):
                y = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask[:, None, None, :])
            return y.reshape(b, h, 1, d)
        scores = torch.matmul(qg, kc.transpose(-1, -2)).float() * d ** -0.5  # [b, hkv, g, P]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).type_as(vc), vc).reshape(b, h, 1, d)


class DecodeCache:
    """The slot cache as one decode step sees it (a ``kv_cache.Cache`` for positions [b, 1]): rows 0..b-1, where
    each writes, and the mask (or flex block mask) of what each attends."""

    def __init__(self, step: DecodeStep, write_pos: torch.Tensor, pos: torch.Tensor) -> None:
        self.cache = step.cache
        self.rows = step.rows[:pos.shape[0]]
        self.write_pos, self.backend, self.flex_options = write_pos, step.backend, step.flex_options
        self.mode, self.pos, self.window = step.mode, pos, step.window
        kv = step.cache.k[0]
        self.splits = split_count(pos.shape[0], kv.shape[1], step.sms, kv.shape[2]) if step.mode == "split" else 0
        self.counts: torch.Tensor | None = step.split_counts if step.mode == "split" else None
        self.block_mask: BlockMask | None = None
        self.mask: torch.Tensor | None = None
        if step.mode == "flex":
            step.flex_pos[:pos.shape[0]].copy_(pos)
            self.block_mask = step.block_mask(pos)
        elif step.mode == "dense":
            self.mask = visible(pos[:, None], step.keys[None, :], step.window)

    def attends(self, kernel: AttentionKernel, positions: int | torch.Tensor, t: int) -> list[DecodeAttend]:
        return [DecodeAttend(k, v, self) for k, v in zip(self.cache.k, self.cache.v, strict=True)]


class DecodeStep(nn.Module):
    """Greedy next tokens [b] for ``io`` [3, b]: tokens, positions, write positions of slots 0..b-1; see the
    module docstring."""

    def __init__(self, model: Transformer, cache: SlotKVCache, backend: str = "auto", window: int | None = None,
                 mode: str = "dense", run_block: RunBlock | None = None) -> None:
        super().__init__()
        if mode not in DECODE_MODES:
            raise ValueError(f"decode attention {mode!r} is not one of {', '.join(DECODE_MODES)}")
        self.model, self.cache, self.run_block = model, cache, run_block
        self.backend, self.window, self.mode = backend, window, mode
        n = cache.k[0].shape[0]
        device = cache.k[0].device
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.register_buffer("rows", torch.arange(n, device=device), persistent=False)
        self.register_buffer("keys", torch.arange(cache.positions, device=device), persistent=False)
        # flex: the slots' positions, read by the block mask's mask function at run time
        self.register_buffer("flex_pos", torch.zeros(n, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("blocks", torch.arange(cache.positions // FLEX_BLOCK, device=device), persistent=False)
        #: FlexAttention's kernel options for the decode kernel (e.g. SPLIT_KV; empty: flex's defaults)
        self.flex_options: dict[str, int] = {}
        if mode == "flex":  # made here, outside any traced code (a compiled block inlines it)
            compiled_flex(True)
        elif mode == "split":
            prepare_split()
            # split: the kernel's count of finished parts per (slot, KV head), zeros between calls (every layer's)
            heads = cache.k[0].shape[1]
            self.register_buffer("split_counts", torch.zeros(n * heads, dtype=torch.int32, device=device),
                                 persistent=False)
        at, window = self.flex_pos, window

        def mask_mod(bi: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return visible(at[bi], kv, window)

        # one function for every step's block mask (a compiled block guards on it)
        self._mask_mod = mask_mod

    def block_mask(self, pos: torch.Tensor) -> BlockMask:
        """The flex block mask of slots at ``pos`` [b]: each slot visits only the key blocks from its window's
        first to the one holding its position, so attention reads the live cache, not all of it; the mask
        function cuts the last block (and the window's first) per key."""
        b = pos.shape[0]
        nblocks = self.cache.positions // FLEX_BLOCK
        last = pos // FLEX_BLOCK
        first = (pos - self.window + 1).clamp(min=0) // FLEX_BLOCK if self.window is not None else torch.zeros_like(pos)
        num = (last - first + 1).to(torch.int32).view(b, 1, 1)
        idx = (first[:, None] + self.blocks[None, :]).clamp(max=nblocks - 1).to(torch.int32).view(b, 1, 1, nblocks)
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=self._mask_mod,
                                        seq_lengths=(1, self.cache.positions), compute_q_blocks=False)

    def forward(self, io: torch.Tensor) -> torch.Tensor:
        tokens, pos, write_pos = io[0], io[1], io[2]
        h = self.model.hidden(tokens[:, None], DecodeCache(self, write_pos, pos), pos[:, None], self.run_block)
        return next_tokens(self.model.output, h[:, 0])


def prefill_chunk(model: Transformer, cache: SlotKVCache, slot: int | torch.Tensor, tokens: torch.Tensor, start: int,
                  last: int, run_block: RunBlock | None = None,
                  wrap: Callable[[Attend], Attend] | None = None) -> torch.Tensor:
    """Write tokens [k, n] of ``slot`` (an int, k = 1; or k slots [k], each row's chunk at the same start) into the
    cache at start.. and return each row's greedy token after index ``last`` [k]."""
    view = cache.prefill(slot, wrap) if isinstance(slot, int) else cache.prefill_rows(slot, wrap)
    h = model.hidden(tokens, view, start, run_block)
    return next_tokens(model.output, h[:, last])

