"""Tensor-parallel serving: a Transformer's weights sliced over the ranks of one replica, plain tensors only.

Megatron's layout, on plain ``nn.Linear`` slices rather than DTensors (a decode step is hundreds of tiny ops,
and it must be captured in a CUDA graph): the fused q/k/v and gate/up projections keep this rank's contiguous
slice of output rows, which their layouts (``workloads.models.projections``) make whole KV groups and whole
pairs of gate/up blocks (the cache holds this rank's KV heads only); ``wo`` and the MLP's down projection keep
this rank's input columns and sum the partial outputs with one all-reduce; the LM head keeps this rank's slice of the
vocabulary, and greedy decoding takes each rank's best (value, token) and picks the first best across ranks,
so the logits never travel. The input embedding is replicated (one row per token; no collective).
Collectives are ``torch.distributed`` functional collectives, traceable by torch.compile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from workloads.engine.forward import max_and_index
from workloads.models.projections import gate_up_refusal
from workloads.models.transformer import Transformer

# all_gather_single replaces all_gather_tensor in newer torch (same arguments)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _rows(lin: nn.Linear, rank: int, world: int) -> nn.Linear:
    """This rank's slice of ``lin``'s output features, as a plain Linear."""
    n = lin.out_features // world
    out = nn.Linear(lin.in_features, n, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(lin.weight[rank * n:(rank + 1) * n])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[rank * n:(rank + 1) * n])
    return out.requires_grad_(False)


def sum_partials(y: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup) -> torch.Tensor:
    """A row-parallel layer's output: the ranks' partial products ``y`` summed by one all-reduce, then the bias."""
    y = funcol.all_reduce(y, "sum", group)
    return y if bias is None else y + bias


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b: this rank's slice of the input features (``local``, a plain Linear
    that FP8 conversion may swap), the bias added once after the sum."""

    def __init__(self, lin: nn.Linear, rank: int, world: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        k = lin.in_features // world
        self.group = group
        self.local = nn.Linear(k, lin.out_features, bias=False, device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            self.local.weight.copy_(lin.weight[:, rank * k:(rank + 1) * k])
        self.local.requires_grad_(False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_partials(self.local(x), self.bias, self.group)


class VocabParallelHead(nn.Module):
    """The LM head's slice of the vocabulary on this rank. ``forward`` gathers full logits (for checks);
    ``greedy`` returns the next tokens with only (value, index) pairs crossing ranks."""

    def __init__(self, lin: nn.Linear, rank: int, world: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.local = _rows(lin, rank, world)
        self.offset, self.world, self.group = rank * self.local.out_features, world, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_gather(self.local(x).contiguous(), x.dim() - 1, self.group)

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = max_and_index(self.local(x))
        pair = torch.stack([vals.float(), (idx + self.offset).float()])  # token ids < 2**24: exact in fp32
        every = _all_gather(pair, 0, self.group).view(self.world, 2, -1)
        best = every[:, 0].argmax(0, keepdim=True)  # the lowest rank on ties: the first token, as argmax
        return every[:, 1].gather(0, best).squeeze(0).long()


def shard(model: Transformer, rank: int, world: int, group: dist.ProcessGroup) -> Transformer:
    """Slice ``model``'s weights in place for ``rank`` of a ``world``-way tensor-parallel group."""
    cfg = model.cfg
    for what, n in (("attention heads", cfg.n_heads), ("KV heads", cfg.n_kv_heads), ("MLP width", cfg.d_ff),
                    ("vocabulary", cfg.vocab_size)):
        if n % world:
            raise ValueError(f"--tp {world} must divide the {what} ({n})")
    why = gate_up_refusal(cfg.d_ff, world) if cfg.arch == "llama" else None
    if why:
        raise ValueError(why)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        attn.wqkv = _rows(attn.wqkv, rank, world)
        attn.wo = RowParallelLinear(attn.wo, rank, world, group)
        for name in ("w13", "w1"):
            if getattr(mlp, name) is not None:
                setattr(mlp, name, _rows(getattr(mlp, name), rank, world))
        mlp.w2 = RowParallelLinear(mlp.w2, rank, world, group)
    model.output = VocabParallelHead(model.output, rank, world, group)
    return model

