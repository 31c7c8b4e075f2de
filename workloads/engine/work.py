"""One engine step as the device runs it, and how a tensor-parallel replica's leader shares it each step.

``Work`` is a scheduler plan reduced to what the model needs: the decode bucket with its inputs (tokens,
positions, write positions of slots 0..b-1) and the prefill chunks (slot, start, tokens). Only the leader of
a tensor-parallel replica schedules; ``StepChannel`` broadcasts each step's work from it to the group's
other ranks (one fixed-size int64 message on the device: header, decode inputs, chunk table, prompt tokens),
which run exactly the same kernels and collectives, then a stop message when the load is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_RUN, _STOP = 1, 2
_HEADER = 4  # op, decode bucket (0: none), prefill chunks, prompt tokens


@dataclass
class Work:
    """Decode of slots 0..bucket-1 from ``stage`` [3, bucket] (none at bucket 0), then each prefill chunk."""

    bucket: int = 0
    stage: torch.Tensor | None = None
    prefill: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (slot, start, tokens [n])


class StepChannel:
    """The leader's work, broadcast to every rank of its tensor-parallel ``group`` (rank 0 of it leads)."""

    def __init__(self, group: dist.ProcessGroup, rows: int, max_tokens: int, device: torch.device) -> None:
        self.group, self.rows, self.max_tokens = group, rows, max_tokens
        self.src = dist.get_global_rank(group, 0)
        self.leader = dist.get_rank(group) == 0
        self.fixed = _HEADER + 3 * rows + 3 * rows  # header, stage [3, rows], chunks [rows, 3]
        self.msg = torch.zeros(self.fixed + max_tokens, dtype=torch.long, device=device)
        self.host = torch.zeros(self.fixed, dtype=torch.long, pin_memory=device.type == "cuda")

    def _work(self, head: list[int]) -> Work:
        """The work a message describes, its tensors views of the device message."""
        op, b, n_chunks, _ = head[:_HEADER]
        assert op == _RUN
        rows = self.rows
        stage = self.msg[_HEADER:_HEADER + 3 * rows].view(3, rows)[:, :b] if b else None
        chunks = head[_HEADER + 3 * rows:_HEADER + 3 * rows + 3 * n_chunks]
        prefill, at = [], self.fixed
        for i in range(n_chunks):
            slot, start, n = chunks[3 * i:3 * i + 3]
            prefill.append((slot, start, self.msg[at:at + n]))
            at += n
        return Work(b, stage, prefill)

    def send(self, work: Work) -> Work:
        """Leader: broadcast ``work``; returns the same work reading the device message."""
        h = self.host.numpy()
        h[:] = 0
        n_tokens = sum(t.numel() for _, _, t in work.prefill)
        if n_tokens > self.max_tokens or len(work.prefill) > self.rows:
            raise ValueError(f"a step of {n_tokens} prompt tokens in {len(work.prefill)} chunks exceeds the "
                             f"channel's {self.max_tokens} tokens / {self.rows} chunks")
        h[:_HEADER] = (_RUN, work.bucket, len(work.prefill), n_tokens)
        if work.stage is not None:
            h[_HEADER:_HEADER + 3 * self.rows].reshape(3, self.rows)[:, :work.bucket] = work.stage.numpy()
        at = self.fixed
        for i, (slot, start, tokens) in enumerate(work.prefill):
            h[_HEADER + 3 * self.rows + 3 * i:_HEADER + 3 * self.rows + 3 * i + 3] = (slot, start, tokens.numel())
            self.msg[at:at + tokens.numel()].copy_(tokens)
            at += tokens.numel()
        self.msg[:self.fixed].copy_(self.host, non_blocking=True)
        dist.broadcast(self.msg, src=self.src, group=self.group)
        return self._work(h.tolist())

    def recv(self) -> Work | None:
        """Follower: the leader's next work, or None once it said stop."""
        dist.broadcast(self.msg, src=self.src, group=self.group)
        head = self.msg[:self.fixed].tolist()
        return None if head[0] == _STOP else self._work(head)

    def stop(self) -> None:
        """Leader: tell the followers the load is over."""
        self.msg[0] = _STOP
        dist.broadcast(self.msg, src=self.src, group=self.group)
