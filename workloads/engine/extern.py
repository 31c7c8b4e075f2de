"""Projections that a compiled decode step runs as library GEMMs (cuBLAS) instead of inductor's own kernel.

With coordinate-descent tuning (the engine's decode options) inductor rewrites a one-row matmul as a
multiply-and-sum and inlines what produced its input into that reduction. For the down projection that input is
SiLU(gate) x up, so every output row recomputes it. Behind an opaque op the input is written once by a fused
pointwise kernel and the GEMM is the library's. Which projections: ``EXTERN`` (measured, docs/benchmarks.md),
or the names in ``BTUNE_DECODE_EXTERN`` (comma-separated paths inside a block, for benchmarks; empty for none).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

#: the block's projections that decode runs as library GEMMs
EXTERN = ("mlp.w2",)


@torch.library.custom_op("btune::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T by the library's GEMM (opaque to inductor)."""
    return F.linear(x, w)


@linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


class ExternLinear(nn.Linear):
    """An ``nn.Linear`` whose matmul is ``btune::linear``; its parameters and their names are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def names() -> tuple[str, ...]:
    """The projections to run as library GEMMs: ``BTUNE_DECODE_EXTERN`` where set, else ``EXTERN``."""
    env = os.environ.get("BTUNE_DECODE_EXTERN")
    if env is None:
        return EXTERN
    return tuple(n.strip() for n in env.split(",") if n.strip())


def apply(layers: nn.ModuleList, which: tuple[str, ...]) -> list[str]:
    """Turn each block's ``which`` projections that are plain ``nn.Linear`` (not FP8's or tensor parallelism's
    own modules) into ``ExternLinear`` in place; the paths changed in the first block."""
    done: list[str] = []
    for i, block in enumerate(layers):
        for name in which:
            mod = block.get_submodule(name) if _has(block, name) else None
            if type(mod) is nn.Linear:
                mod.__class__ = ExternLinear
                if i == 0:
                    done.append(name)
    return done


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True
