"""Prefill of one slot's prompt chunk with its elementwise work compiled (llama-arch models, fused weights).

Eager prefill (``forward.prefill_chunk``) runs each norm, RoPE and activation as several kernels over the
whole chunk, and q, k, v (and gate, up) as separate GEMMs. Here each layer is:

1. compiled: the residual add, RMSNorm, one GEMM over the fused q/k/v weight, RoPE;
2. eager: the cache write and attention (the model's kernel and mask), then the output projection;
3. compiled: the residual add, RMSNorm, one GEMM over the fused gate/up weight, SiLU times up;
4. eager: the down projection.

The projections that end in a sum over tensor-parallel ranks (2 and 4) stay the model's own modules, so a
sharded model prefills through the same code. The compiled pieces take each layer's weights as arguments, so
one graph serves every layer, with the chunk length dynamic: warm-up compiles them once (a one-token chunk
apart).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from workloads.engine.cache import SlotKVCache
from workloads.engine.forward import next_tokens
from workloads.models.attention import AttentionKernel
from workloads.models.norms import RMSNorm, rms_norm
from workloads.models.rope import rotate
from workloads.models.transformer import Transformer

Fused = tuple[torch.Tensor, torch.Tensor | None]


def _mark_tokens_dynamic(*tensors: torch.Tensor | None) -> None:
    """Compile the token dim (dim 1) of each tensor for any length (a length of 1 stays its own graph)."""
    for t in tensors:
        if t is not None and t.shape[1] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 1)


def _pieces(eps: float, nq: int, nkv: int, head_dim: int) -> tuple[Callable, Callable]:
    """The two compiled per-layer pieces for a model's constants (see the module docstring)."""

    def attention_in(h: torch.Tensor, delta: torch.Tensor | None, norm_w: torch.Tensor, qkv_w: torch.Tensor,
                     qkv_b: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        if delta is not None:
            h = h + delta
        b, n, _ = h.shape
        q, k, v = F.linear(rms_norm(h, norm_w, eps), qkv_w, qkv_b).split([nq, nkv, nkv], dim=-1)
        q, k = rotate(q.view(b, n, -1, head_dim), cos, sin), rotate(k.view(b, n, -1, head_dim), cos, sin)
        return h, q.transpose(1, 2), k.transpose(1, 2), v.view(b, n, -1, head_dim).transpose(1, 2)

    def mlp_in(h: torch.Tensor, o: torch.Tensor, norm_w: torch.Tensor, gate_up_w: torch.Tensor,
               gate_up_b: torch.Tensor | None):
        h = h + o
        g, u = F.linear(rms_norm(h, norm_w, eps), gate_up_w, gate_up_b).chunk(2, dim=-1)
        return h, F.silu(g) * u

    return torch.compile(attention_in), torch.compile(mlp_in)


class CompiledPrefill:
    """``prefill(slot, tokens [1, n], start, last)``: write the chunk's keys and values into ``slot``'s cache at
    start.. and return the greedy token after index ``last`` [1], as ``forward.prefill_chunk`` does."""

    def __init__(self, model: Transformer, kernel: AttentionKernel, cache: SlotKVCache, qkv: list[Fused],
                 gate_up: list[Fused]) -> None:
        self.model, self.kernel, self.cache = model, kernel, cache
        self.qkv, self.gate_up = qkv, gate_up
        attn = model.layers[0].attn
        nq, nkv = attn.wq.weight.shape[0], attn.wk.weight.shape[0]  # this rank's heads under tensor parallelism
        self._attention_in, self._mlp_in = _pieces(model.cfg.norm_eps, nq, nkv, model.cfg.head_dim)

    @staticmethod
    def supports(model: Transformer, qkv: list[Fused | None], gate_up: list[Fused | None]) -> bool:
        """Whether ``model`` has what the compiled pieces compute: RMSNorm, RoPE, fused q/k/v and gate/up."""
        norms = [m for layer in model.layers for m in (layer.attn_norm, layer.mlp_norm)] + [model.norm]
        return (model.rope is not None and model.pos_embeddings is None and all(type(m) is RMSNorm for m in norms)
                and all(f is not None for f in qkv) and all(f is not None for f in gate_up))

    def __call__(self, slot: int, tokens: torch.Tensor, start: int, last: int) -> torch.Tensor:
        m, kernel = self.model, self.kernel
        n = tokens.shape[1]
        end = start + n
        h = m.tok_embeddings(tokens)
        table = m.rope[:, start:end]
        cos, sin = table[0][None, :, None, :], table[1][None, :, None, :]
        mask = kernel.mask(n, end, tokens.device)
        delta = None
        for i, layer in enumerate(m.layers):
            _mark_tokens_dynamic(h, delta, cos, sin)
            h, q, k, v = self._attention_in(h, delta, layer.attn_norm.weight, *self.qkv[i], cos, sin)
            k, v = self.cache.slot(i, slot).update(start, k, v, kernel.kv_multiple)
            y = kernel(q, k, v, mask)
            o = layer.attn.wo(y.transpose(1, 2).reshape(1, n, -1))
            _mark_tokens_dynamic(h, o)
            h, act = self._mlp_in(h, o, layer.mlp_norm.weight, *self.gate_up[i])
            delta = layer.mlp.w2(act)
        return next_tokens(m.output, m.norm(h[:, last] + delta[:, last]))
