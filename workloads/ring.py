"""Ring attention for context parallelism: PyTorch's implementation, called on this rank's chunks.

PyTorch's context parallel (``torch.distributed.tensor.experimental``) runs ring attention by intercepting the
CUDA SDPA ops of DTensors. btune slices the sequence itself (``parallel.cp_chunks``: rank i keeps chunks i and
2N-1-i, torch's head-tail load balancing), so it calls torch's ring directly (``_templated_ring_attention`` and
its backward) with the fused attention op of the device: flash on CUDA, the CPU flash kernel on CPU (so the ring
is validated on gloo too). Each step attends this rank's queries to one rank's keys and values and merges the
partial outputs by their log-sum-exp in fp32; the keys and values travel rank to rank (``ring``: torch's
all-to-all rotater) or are all-gathered once (``ring-gather``: torch's default rotater). The flash ops take as many
key heads as query heads, so grouped-query keys and values are expanded first (the ring moves
n_heads / n_kv_heads times the bytes btune's ``gather`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: torch's rotater for each ring value of --cp-attention (declared in specs.dense.CP_ATTENTION)
_ROTATE = {"ring": "alltoall", "ring-gather": "allgather"}


@dataclass(frozen=True)
class _Ops:
    """One device's fused attention op pair and the arguments torch's ring passes through to them."""

    forward: Any
    backward: Any
    forward_kwargs: dict[str, Any]
    # names of the forward's extra outputs that its backward takes back
    rest: tuple[str, ...]
    backward_kwargs: dict[str, Any]


def _ops(device_type: str) -> _Ops:
    aten = torch.ops.aten
    if device_type == "cpu":
        return _Ops(aten._scaled_dot_product_flash_attention_for_cpu.default,
                    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                    {"dropout_p": 0.0}, (), {"dropout_p": 0.0})
    return _Ops(aten._scaled_dot_product_flash_attention.default,
                aten._scaled_dot_product_flash_attention_backward.default,
                {"dropout_p": 0.0, "return_debug_mask": False},
                ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset"),
                {"dropout_p": 0.0})


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                group: dist.ProcessGroup, ops: _Ops) -> torch.Tensor:
        from torch.distributed.tensor.experimental._context_parallel._attention import _templated_ring_attention

        out, lse, *rest = _templated_ring_attention(group, 2, ops.forward, q, k, v, is_causal=True,
                                                    **ops.forward_kwargs)
        extra = dict(zip(ops.rest, rest, strict=False))
        tensors = {n: t for n, t in extra.items() if isinstance(t, torch.Tensor)}
        ctx.names = tuple(tensors)
        ctx.scalars = {n: t for n, t in extra.items() if n not in tensors}
        ctx.save_for_backward(q, k, v, out, lse, *tensors.values())
        ctx.group, ctx.ops = group, ops
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention_backward,
        )

        q, k, v, out, lse, *saved = ctx.saved_tensors
        extra = {**dict(zip(ctx.names, saved, strict=True)), **ctx.scalars}
        dq, dk, dv, *_ = _templated_ring_attention_backward(
            ctx.group, 2, ctx.ops.backward, grad_out=grad.contiguous(), grad_out_name="grad_out", query=q, key=k,
            value=v, out=out, logsumexp=lse, is_causal=True, **extra, **ctx.ops.backward_kwargs)
        return dq, dk, dv, None, None


class RingAttention:
    """The model's attention kernel under context parallelism with torch's ring (``--cp-attention ring`` or
    ``ring-gather``): the same interface as the kernel it replaces. ``fault="cp-local-keys"`` plants the
    validator's bug: no ring, each rank attends its own keys only."""

    def __init__(self, inner: Any, group: dist.ProcessGroup, method: str, fault: str | None = None) -> None:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method(_ROTATE[method])  # torch's ring reads it from a module-level option
        self.inner, self.group, self.fault = inner, group, fault
        self.kv_multiple = 1
        self.window = None

    def mask(self, q_len: int, kv_len: int, device: Any) -> None:
        return None

    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        if self.fault == "cp-local-keys":
            return self.inner(q, k, v, None)
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _Ring.apply(q, k, v, self.group, _ops(q.device.type))
