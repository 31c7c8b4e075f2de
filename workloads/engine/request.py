"""A request in the engine, with its timeline: arrival, every token's time, finish (seconds since the load began).

Per design.md: TTFT = first token - arrival (queueing included); TPOT = (E2E - TTFT) / (output tokens - 1);
ITL = each gap between consecutive tokens; E2E = finish - arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workloads.engine.loadgen import RequestSpec


@dataclass
class Request:
    """A request being served: its prompt, how many tokens it wants, and what it got when."""

    spec: RequestSpec
    prompt: Any  # token ids (a sequence of ints, or a 1-D tensor)
    replica: int = 0
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None

    @property
    def rid(self) -> int:
        return self.spec.rid

    @property
    def arrival(self) -> float:
        return self.spec.arrival

    @property
    def prompt_len(self) -> int:
        return self.spec.prompt_len

    @property
    def output_len(self) -> int:
        """The number of output tokens asked for (the request stops there; no end-of-sequence token)."""
        return self.spec.output_len

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def position(self) -> int:
        """The position of the next token to feed: the last generated one (decode only)."""
        return self.prompt_len + len(self.tokens) - 1

    def add_token(self, token: int, t: float) -> bool:
        """Record one generated token at time ``t``; True when that completes the request."""
        self.tokens.append(token)
        self.token_times.append(t)
        if len(self.tokens) >= self.output_len:
            self.finish = t
            return True
        return False

    def record(self) -> dict[str, Any]:
        """The request's raw timeline and its latencies in ms (the ``request`` event's fields)."""
        return timeline(self.rid, self.arrival, self.token_times, self.finish, self.prompt_len, self.output_len,
                        self.replica, self.spec.client)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def timeline(rid: int, arrival: float, token_times: list[float], finish: float | None, prompt_len: int,
             output_len: int, replica: int = 0, client: int | None = None,
             output_tokens: int | None = None) -> dict[str, Any]:
    """Raw times (s since the load began) and the derived latencies (ms); None where undefined.

    ``output_tokens``: the tokens produced when a time is not known for each (an endpoint's stream chunks may
    carry several); default one per entry of ``token_times``. TPOT divides by it less one."""
    first = token_times[0] if token_times else None
    n = len(token_times) if output_tokens is None else output_tokens
    ttft = first - arrival if first is not None else None
    e2e = finish - arrival if finish is not None else None
    tpot = (e2e - ttft) / (n - 1) if e2e is not None and ttft is not None and n > 1 else None
    return {
        "rid": rid,
        "replica": replica,
        "client": client,
        "finished": finish is not None,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "output_tokens": n,
        "arrival_s": arrival,
        "first_token_s": first,
        "finish_s": finish,
        "token_s": list(token_times),
        "ttft_ms": _ms(ttft),
        "tpot_ms": _ms(tpot),
        "e2e_ms": _ms(e2e),
    }
