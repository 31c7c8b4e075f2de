"""Prefill of one slot's prompt chunk with everything but attention compiled (llama-arch models, fused weights).

Eager prefill (``forward.prefill_chunk``) runs each norm, RoPE and activation as several kernels over the
whole chunk, q, k, v (and gate, up) as separate GEMMs, and issues some 30 operations a layer from Python: at
512-token chunks of llama-3.1-8b the host, not the GPU, sets the pace. Here a chunk is

- compiled ``first``: RMSNorm, one GEMM over the fused q/k/v weight, RoPE (layer 0);
- per layer, eager: the cache write and attention (the model's kernel and mask); then compiled ``middle``: the
  output projection, residual add, RMSNorm, one GEMM over the fused gate/up weight, SiLU times up, the down
  projection, residual add, and the next layer's RMSNorm, q/k/v GEMM and RoPE (``last`` stops after the MLP).

Under tensor parallelism the output and down projections sum their partial products over the replica's
ranks with one all-reduce each inside the compiled code. The compiled pieces take each layer's weights as
arguments, so one graph serves every layer, with the chunk length dynamic: warm-up compiles them once (a
one-token chunk apart).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workloads.engine.cache import SlotKVCache
from workloads.engine.forward import next_tokens
from workloads.engine.tensor_parallel import RowParallelLinear, sum_partials
from workloads.models.attention import AttentionKernel
from workloads.models.norms import RMSNorm, rms_norm
from workloads.models.rope import rotate
from workloads.models.transformer import Transformer

Fused = tuple[torch.Tensor, torch.Tensor | None]


def _mark_tokens_dynamic(*tensors: torch.Tensor, dim: int = 1) -> None:
    """Compile dim ``dim`` (the tokens) of each tensor for any length (a length of 1 stays its own graph)."""
    for t in tensors:
        if t.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _projection(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dist.ProcessGroup | None] | None:
    """(weight, bias, tensor-parallel group) of a plain or row-parallel linear; None for any other layer."""
    if type(lin) is nn.Linear:
        return lin.weight, lin.bias, None
    if isinstance(lin, RowParallelLinear) and type(lin.local) is nn.Linear:
        return lin.local.weight, lin.bias, lin.group
    return None


def _pieces(eps: float, nq: int, nkv: int, head_dim: int,
            group: dist.ProcessGroup | None) -> tuple[Callable, Callable, Callable]:
    """The compiled pieces ``first``, ``middle`` and ``last`` for a model's constants (module docstring)."""

    def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b) if group is None else sum_partials(F.linear(x, w), b, group)

    def first(h: torch.Tensor, norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
              cos: torch.Tensor, sin: torch.Tensor):
        b, n, _ = h.shape
        q, k, v = F.linear(rms_norm(h, norm_w, eps), qkv_w, qkv_b).split([nq, nkv, nkv], dim=-1)
        q, k = rotate(q.view(b, n, -1, head_dim), cos, sin), rotate(k.view(b, n, -1, head_dim), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, n, -1, head_dim).transpose(1, 2)

    def last(h: torch.Tensor, y: torch.Tensor, wo_w: torch.Tensor, wo_b: torch.Tensor | None,
             norm_w: torch.Tensor, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor | None, w2_w: torch.Tensor,
             w2_b: torch.Tensor | None) -> torch.Tensor:
        h = h + project(y, wo_w, wo_b)
        g, u = F.linear(rms_norm(h, norm_w, eps), gate_up_w, gate_up_b).chunk(2, dim=-1)
        return h + project(F.silu(g) * u, w2_w, w2_b)

    def middle(h: torch.Tensor, y: torch.Tensor, wo_w: torch.Tensor, wo_b: torch.Tensor | None,
               norm_w: torch.Tensor, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor | None, w2_w: torch.Tensor,
               w2_b: torch.Tensor | None, next_norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
               cos: torch.Tensor, sin: torch.Tensor):
        h = last(h, y, wo_w, wo_b, norm_w, gate_up_w, gate_up_b, w2_w, w2_b)
        return (h, *first(h, next_norm_w, qkv_w, qkv_b, cos, sin))

    return torch.compile(first), torch.compile(middle), torch.compile(last)


class CompiledPrefill:
    """``prefill(slot, tokens [1, n], start, last)``: write the chunk's keys and values into ``slot``'s cache at
    start.. and return the greedy token after index ``last`` [1], as ``forward.prefill_chunk`` does."""

    def __init__(self, model: Transformer, kernel: AttentionKernel, cache: SlotKVCache, qkv: list[Fused],
                 gate_up: list[Fused]) -> None:
        self.model, self.kernel, self.cache = model, kernel, cache
        self.qkv, self.gate_up = qkv, gate_up
        # (weight, bias) of each layer's output and down projections; ``supports`` saw one group for all
        self.wo = [_projection(layer.attn.wo)[:2] for layer in model.layers]
        self.w2 = [_projection(layer.mlp.w2)[:2] for layer in model.layers]
        attn = model.layers[0].attn
        nq, nkv = attn.wq.weight.shape[0], attn.wk.weight.shape[0]  # this rank's heads under tensor parallelism
        group = _projection(attn.wo)[2]
        self._first, self._middle, self._last = _pieces(model.cfg.norm_eps, nq, nkv, model.cfg.head_dim, group)

    @staticmethod
    def supports(model: Transformer, qkv: list[Fused | None], gate_up: list[Fused | None]) -> bool:
        """Whether ``model`` has what the compiled pieces compute: RMSNorm, RoPE, fused q/k/v and gate/up, plain
        or row-parallel output and down projections (all in one tensor-parallel group)."""
        norms = [m for layer in model.layers for m in (layer.attn_norm, layer.mlp_norm)] + [model.norm]
        projections = [_projection(m) for layer in model.layers for m in (layer.attn.wo, layer.mlp.w2)]
        return (model.rope is not None and model.pos_embeddings is None and all(type(m) is RMSNorm for m in norms)
                and all(f is not None for f in qkv) and all(f is not None for f in gate_up)
                and all(p is not None for p in projections) and len({id(p[2]) for p in projections if p}) == 1)

    def __call__(self, slot: int, tokens: torch.Tensor, start: int, last: int) -> torch.Tensor:
        m, kernel, cache = self.model, self.kernel, self.cache
        n = tokens.shape[1]
        end = start + n
        h = m.tok_embeddings(tokens)
        table = m.rope[:, start:end]
        cos, sin = table[0][None, :, None, :], table[1][None, :, None, :]
        mask = kernel.mask(n, end, tokens.device)
        _mark_tokens_dynamic(h, cos, sin)
        q, k, v = self._first(h, m.layers[0].attn_norm.weight, *self.qkv[0], cos, sin)
        final = len(m.layers) - 1
        for i, layer in enumerate(m.layers):
            kc, vc = cache.slot(i, slot).update(start, k, v, kernel.kv_multiple)
            # [1, n, heads x head_dim], contiguous whichever kernel ran (their output layouts differ: one graph)
            y = kernel(q, kc, vc, mask).transpose(1, 2).reshape(1, n, -1).contiguous()
            _mark_tokens_dynamic(h, y)
            weights = (*self.wo[i], layer.mlp_norm.weight, *self.gate_up[i], *self.w2[i])
            if i < final:
                nxt = m.layers[i + 1].attn_norm.weight
                h, q, k, v = self._middle(h, y, *weights, nxt, *self.qkv[i + 1], cos, sin)
            else:
                h = self._last(h, y, *weights)
        return next_tokens(m.output, m.norm(h[:, last]))
