"""Balance bookkeeping for a training/prefill loop: device-side accumulation, one read per window.

Each step ``add`` sums the model's stats rows ([layers, E + 4]: counts, dropped, router entropy sum,
balance loss, tokens) into a device tensor. When a window of ``window`` steps closes, the sums are
copied to (pinned) host memory asynchronously and the accumulator is zeroed; the step loop's
``extra(step)`` callback, which runs after that step's end has synchronised, reads the copy and emits one
``experts`` event of raw per-layer sums (the console computes the balance figures: tuner.balance). No extra
host-device sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Emit = Callable[..., None]


class BalanceWindow:
    """Accumulates stats rows on ``device`` and emits an ``experts`` event per window through ``emit``
    (``Emitter.experts``)."""

    def __init__(self, emit: Emit, n_layers: int, n_experts: int, window: int, device: torch.device,
                 layer_ids: list[int], top_k: int, capacity: int | None) -> None:
        self.emit, self.window, self.device = emit, window, device
        self.n_experts, self.layer_ids, self.top_k, self.capacity = n_experts, layer_ids, top_k, capacity
        self.acc = torch.zeros(n_layers, n_experts + 4, dtype=torch.float64, device=device)
        self.start = 0  # first step of the open window
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}  # window end step -> (start, host copy)
        self.last: dict[str, Any] | None = None
        self.last_step = -1  # the last step added
        self.events = 0

    def add(self, step: int, stats: torch.Tensor) -> None:
        """Add step ``step``'s stats rows; close the window after its last step."""
        self.acc += stats.detach().to(torch.float64)
        self.last_step = step
        if (step + 1 - self.start) >= self.window:
            self._close(step)

    def _close(self, step: int) -> None:
        cuda = self.device.type == "cuda"
        host = torch.empty(self.acc.shape, dtype=self.acc.dtype, pin_memory=cuda)
        host.copy_(self.acc, non_blocking=cuda)
        self.acc.zero_()
        self.pending[step] = (self.start, host)
        self.start = step + 1

    def extra(self, step: int) -> dict[str, Any]:
        """The step loop's callback: emit the window that closed at ``step`` (its copy is complete by now)."""
        item = self.pending.pop(step, None)
        if item is not None:
            self._emit(item[0], step, item[1])
        return {}

    def flush(self) -> None:
        """Emit windows not emitted yet, the open partial one included (end of run; syncs once)."""
        for step in sorted(self.pending):
            start, host = self.pending.pop(step)
            self._emit(start, step, host)
        if self.last_step >= self.start:
            self._emit(self.start, self.last_step, self.acc.cpu())
            self.acc.zero_()
            self.start = self.last_step + 1

    def _emit(self, start: int, end: int, sums: torch.Tensor) -> None:
        rows = sums.tolist()
        e, n_steps = self.n_experts, end - start + 1
        counts = [[round(v) for v in r[:e]] for r in rows]
        dropped = [round(r[e]) for r in rows]
        tokens = [r[e + 3] for r in rows]
        router_entropy = [r[e + 1] / t if t else None for r, t in zip(rows, tokens, strict=True)]
        aux = [r[e + 2] / n_steps for r in rows]
        self.last = {"window": [start, end]}
        self.events += 1
        self.emit(step=end, window=[start, end], steps=n_steps, layer_ids=self.layer_ids,
                  n_experts=e, top_k=self.top_k, capacity=self.capacity, tokens=round(tokens[0]),
                  counts=counts, dropped=dropped, router_entropy=router_entropy, aux_loss=aux)
