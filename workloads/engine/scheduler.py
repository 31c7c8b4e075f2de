"""Continuous batching: KV-cache slots, the waiting queue, and what each engine step runs.

Every step decodes one token for each request whose prompt is fully in the cache, and spends up to
``max_prefill_tokens`` prompt tokens on prefill: requests already part-way through their prompt first,
then waiting requests in arrival order while a slot is free. New requests therefore join between decode
steps, and a long prompt is chunked over several steps instead of stalling everyone's decode.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from workloads.engine.request import Request


@dataclass
class Plan:
    """One engine step: the requests to decode, and prefill chunks as (request, start, length)."""

    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)

    #: Cached positions the step's attention must read, taken when the plan is made: a decoded sequence's
    #: keys up to the fed token, a prompt chunk's up to its last token (each read once: what MBU counts).
    kv_tokens: int = 0

    @property
    def weight_passes(self) -> int:
        """Forward passes over the weights: one for the decode batch, one per prompt chunk."""
        return (1 if self.decode else 0) + len(self.prefill)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, _, n in self.prefill)


class Scheduler:
    """Owns the slots (one per sequence in the KV cache) and the queue of requests waiting for one."""

    def __init__(self, max_batch: int, max_prefill_tokens: int, cache_len: int) -> None:
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1")
        self.max_batch, self.max_prefill_tokens, self.cache_len = max_batch, max_prefill_tokens, cache_len
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._free = list(range(max_batch))  # a heap: the lowest free slot is taken first

    def add(self, req: Request) -> None:
        """Queue an arrived request; ValueError if it can never fit in a slot."""
        if req.prompt_len + req.output_len > self.cache_len:
            raise ValueError(f"request {req.rid}: prompt {req.prompt_len} + output {req.output_len} tokens exceed "
                             f"the KV cache's {self.cache_len} positions per sequence")
        self.waiting.append(req)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.slots)

    def unfinished(self) -> list[Request]:
        """Requests waiting or in a slot."""
        return [*self.running, *self.waiting]

    def kv_tokens(self) -> int:
        """Positions of the KV cache holding live keys and values."""
        return sum(r.prefilled + max(len(r.tokens) - 1, 0) for r in self.running)

    def plan(self) -> Plan:
        """This step's work; takes slots for the waiting requests it starts to prefill."""
        plan = Plan(decode=[r for r in self.running if r.prefilled == r.prompt_len])
        budget = self.max_prefill_tokens
        partial = sorted((r for r in self.running if r.prefilled < r.prompt_len), key=lambda r: (r.arrival, r.rid))
        for r in partial:
            if budget <= 0:
                break
            n = min(r.prompt_len - r.prefilled, budget)
            plan.prefill.append((r, r.prefilled, n))
            budget -= n
        while budget > 0 and self.waiting and self._free:
            r = self.waiting.popleft()
            r.slot = heapq.heappop(self._free)
            self.slots[r.slot] = r
            n = min(r.prompt_len, budget)
            plan.prefill.append((r, 0, n))
            budget -= n
        plan.kv_tokens = sum(r.position + 1 for r in plan.decode) + sum(start + n for _, start, n in plan.prefill)
        return plan

    def commit(self, plan: Plan, outputs: list[tuple[Request, int]], t: float) -> list[Request]:
        """Apply a finished step: prefill progress, new tokens at time ``t``; free and return finished requests."""
        for r, start, n in plan.prefill:
            r.prefilled = start + n
        done = []
        for r, token in outputs:
            if r.add_token(token, t):
                done.append(r)
                assert r.slot is not None
                self.slots[r.slot] = None
                heapq.heappush(self._free, r.slot)
                r.slot = None
        return done
