"""The engine's forward passes, built from the model's own modules (embeddings, blocks, norm, head, RoPE).

``prefill_chunk``: a run of prompt tokens of one slot, at positions start..start+n-1, through the
model's blocks with a batch-1 view of that slot's cache (the model's attention kernel and masks).

``DecodeStep``: one token for each of slots 0..b-1, each at its own position (sequences of different
lengths in one batch). Keys and values are written at ``write_pos`` (the scratch column for idle slots);
each slot attends its cache up to its position through a length mask. Attention runs on grouped queries
(the query heads of one KV head stacked as queries), so GQA needs no copy of the cache. With ``flex`` (and
``auto`` on a GPU) it is FlexAttention's decoding kernel over a block mask built in the step from the slots'
positions, so each slot reads only its live key blocks; otherwise two batched matmuls around a masked fp32
softmax (``auto`` on CPU), or SDPA with the forced kernel, over the whole cache under a length mask.

Where q, k, v (and the MLP's gate and up) are plain ``nn.Linear`` layers, the step runs each group as one
GEMM over a fused weight; the model's own weights become views of it, so prefill and decode share memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from workloads.engine.cache import SlotKVCache
from workloads.models.attention import AttentionKernel, compiled_flex, visible
from workloads.models.rope import rotate
from workloads.models.transformer import Transformer

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
FLEX_BLOCK = 128


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
    return next_tokens(model.output, model.norm(h[:, last]))


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


def fuse_linears(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) stacking ``linears``' outputs, each linear's own parameters becoming views of it;
    None unless all are plain ``nn.Linear`` of one dtype and device (FP8-swapped layers keep their own)."""
    if not linears or any(type(m) is not nn.Linear for m in linears):
        return None
    ws = [m.weight for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) and not all(has_bias):
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in ws])
        bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        row = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
            row += n
    return weight, bias


class DecodeStep(nn.Module):
    """Greedy next tokens [b] for ``io`` [3, b]: tokens, positions, write positions of slots 0..b-1; see the
    module docstring."""

    def __init__(self, model: Transformer, cache: SlotKVCache, backend: str = "auto", window: int | None = None,
                 fuse: bool = True, flex: bool = False) -> None:
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
        self.register_buffer("blocks", torch.arange(cache.positions // FLEX_BLOCK, device=cache.k[0].device),
                             persistent=False)
        self.flex = flex
        if flex:  # made here, outside the traced step (torch.compile of the step inlines it)
            compiled_flex(True)
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        self.gate_up: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            self.qkv.append(fuse_linears([attn.wq, attn.wk, attn.wv]) if fuse else None)
            gated = getattr(mlp, "w3", None) is not None
            self.gate_up.append(fuse_linears([mlp.w1, mlp.w3]) if fuse and gated else None)

    @property
    def fused(self) -> bool:
        return any(f is not None for f in self.qkv)

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
        at, window = self.flex_pos, self.window

        def mask_mod(bi: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return visible(at[bi], kv, window)

        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                        seq_lengths=(1, self.cache.positions), compute_q_blocks=False)

    def _mask(self, pos: torch.Tensor) -> torch.Tensor:
        return visible(pos[:, None], self.keys[None, :], self.window)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                block_mask: BlockMask | None) -> torch.Tensor:
        """q [b, H, D] against k, v [b, Hkv, P, D]; returns [b, H * D]."""
        b, h, d = q.shape
        hkv = k.shape[1]
        if block_mask is not None:
            y = compiled_flex(True)(q[:, :, None], k, v, block_mask=block_mask, enable_gqa=h != hkv)
            return y.reshape(b, h * d)
        qg = q.view(b, hkv, h // hkv, d)  # query head j uses KV head j // (h / hkv), as repeat_interleave
        assert mask is not None
        if self.backend in _SDPA:
            with sdpa_kernel(_SDPA[self.backend]):
                y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :])
            return y.reshape(b, h * d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * d ** -0.5  # [b, hkv, g, P]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1).type_as(v), v)
        return y.reshape(b, h * d)

    def forward(self, io: torch.Tensor) -> torch.Tensor:
        tokens, pos, write_pos = io[0], io[1], io[2]
        m = self.model
        b = tokens.shape[0]
        h = m.tok_embeddings(tokens)
        if m.pos_embeddings is not None:
            h = h + m.pos_embeddings(pos)
        if m.rope is not None:
            cos, sin = m.rope[0][pos][:, None, :], m.rope[1][pos][:, None, :]
        block_mask, mask = None, None
        if self.flex:
            self.flex_pos[:b].copy_(pos)
            block_mask = self.block_mask(pos)
        else:
            mask = self._mask(pos)
        rows = self.rows[:b]
        for i, layer in enumerate(m.layers):
            attn = layer.attn
            x = layer.attn_norm(h)
            qkv = self.qkv[i]
            if qkv is not None:
                nq, nkv = attn.wq.weight.shape[0], attn.wk.weight.shape[0]
                q, k, v = F.linear(x, *qkv).split([nq, nkv, nkv], dim=-1)
                q, k, v = (t.reshape(b, -1, self.head_dim) for t in (q, k, v))
            else:
                q = attn.wq(x).view(b, -1, self.head_dim)
                k = attn.wk(x).view(b, -1, self.head_dim)
                v = attn.wv(x).view(b, -1, self.head_dim)
            if m.rope is not None:
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc[rows, :, write_pos] = k
            vc[rows, :, write_pos] = v
            h = h + attn.wo(self._attend(q, kc[:b], vc[:b], mask, block_mask))
            x = layer.mlp_norm(h)
            gate_up = self.gate_up[i]
            if gate_up is not None:
                g, u = F.linear(x, *gate_up).chunk(2, dim=-1)
                h = h + layer.mlp.w2(F.silu(g) * u)
            else:
                h = h + layer.mlp(x)
        return next_tokens(m.output, m.norm(h))
