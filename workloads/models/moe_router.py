"""Top-k router: softmax or sigmoid scores, a selection bias for auxiliary-loss-free balancing."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    """Where each token goes: ``indices`` [N, k], ``gates`` [N, k] (fp32) and ``probs`` [N, E] (fp32).

    ``probs`` are the routing probabilities (softmax, or sigmoid scores normalised to sum to 1) that the
    router entropy and the auxiliary loss use.
    """

    indices: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor


class Router(nn.Module):
    """Scores every expert for every token in fp32 and picks the top k.

    ``bias`` (a buffer, zero unless aux-free balancing moves it) is added to the scores for the top-k
    choice only; the gates are the unbiased scores of the chosen experts, normalised to sum to 1 when
    k > 1 (with k = 1 the raw score, so the router still gets a gradient, unless ``normalize_top1``: Mixtral
    normalises at every k, so its top-1 gate is 1), times ``route_scale``.
    The weight is a bare parameter, not an nn.Linear, so FP8 conversion leaves the router alone.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, score: str = "softmax",
                 route_scale: float = 1.0, normalize_top1: bool = False) -> None:
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score {score!r} is not softmax or sigmoid")
        self.top_k, self.score, self.route_scale = top_k, score, route_scale
        self.normalize_top1 = normalize_top1
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("bias", torch.zeros(n_experts))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        nn.init.normal_(self.weight, std=std if std is not None else 1 / math.sqrt(self.weight.shape[1]))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> Routing:
        """Route tokens x [N, d]."""
        logits = F.linear(x.float(), self.weight.float())
        if self.score == "softmax":
            scores = probs = logits.softmax(-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        indices = (scores.detach() + self.bias).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, indices)
        if self.top_k > 1 or self.normalize_top1:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(indices, gates * self.route_scale, probs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Keep the bias in fp32 through ``.to(dtype)``: bf16 would swallow 1e-3 steps."""
        super()._apply(fn, recurse)
        if self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's rule: raise the bias of under-loaded experts and lower it for over-loaded ones by
        ``rate`` (the sign of mean load minus load), then recentre the bias at zero mean."""
        counts = counts.to(self.bias.dtype)
        self.bias.add_(rate * torch.sign(counts.mean() - counts))
        self.bias.sub_(self.bias.mean())
