"""The serving loop: admit what the load generator says has arrived, run one engine step, stamp its tokens.

No fixed tick: the loop steps as fast as the engine goes and sleeps only while nothing is queued or
running, until the next arrival. Every token of a step is stamped with the host clock when the step
ends (after the device finished it), since request latencies are wall time. A step's time runs from the call
that made it, or, when the engine had queued it during the previous step (look-ahead), from the end of that
one. Stops when the generator has nothing more to send and every request has finished, or when
``drain_timeout`` seconds have passed since it stopped sending, or after ``max_steps`` steps, or on Ctrl+C (or
``stop``); requests still unfinished are returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from workloads.engine.loadgen import LoadGenerator, RequestSpec
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan, Scheduler


class Runs(Protocol):
    def run(self, plan: Plan) -> list[tuple[Request, int]]: ...


def launched_ahead(engine: Runs) -> bool:
    """Whether the engine's last step had been queued on the device during the step before it (look-ahead)."""
    return bool(getattr(engine, "launched_ahead", False))


@dataclass
class Hooks:
    """Where the loop reports: each step, each finished request, and engine state (at most every
    ``series_interval`` seconds, plus once at the start and once at the end)."""

    step: Callable[[int, float, int, Plan, float], None] = lambda i, ms, tokens, plan, t: None
    finished: Callable[[Request], None] = lambda r: None
    series: Callable[[dict[str, Any]], None] = lambda fields: None
    draining: Callable[[], None] = lambda: None  #: once: no more requests to issue, some still running
    series_interval: float = 0.05


@dataclass
class LoadResult:
    """Every request admitted, the unfinished ones, the step count, the end time and why it stopped."""

    requests: list[Request] = field(default_factory=list)
    unfinished: list[Request] = field(default_factory=list)
    steps: int = 0
    end: float = 0.0
    stopped: str = "drained"


def engine_state(sched: Scheduler, now: float) -> dict[str, Any]:
    """Queue depth, running batch size and KV-cache use (fraction of all slots' positions) at ``now``."""
    capacity = sched.max_batch * sched.cache_len
    kv = sched.kv_tokens()
    return {"t_load": now, "queue": len(sched.waiting), "running": len(sched.running), "kv_used": kv / capacity,
            "kv_tokens": kv}


def run_load(engine: Runs, sched: Scheduler, gen: LoadGenerator, make_request: Callable[[RequestSpec], Request],
             clock: Callable[[], float], sleep: Callable[[float], None], hooks: Hooks | None = None,
             max_steps: int = 0, drain_timeout: float = 0.0,
             stop: Callable[[], bool] = lambda: False) -> LoadResult:
    """Serve ``gen``'s requests on ``engine`` until done; times are seconds since the call began. ``stop()``
    true (checked between steps) ends the load as interrupted, as Ctrl+C does."""
    hooks = hooks or Hooks()
    res = LoadResult()
    t0 = clock()
    deadline: float | None = None
    draining = False
    last_series = -float("inf")
    now = 0.0
    last_end: float | None = None
    try:
        while True:
            if stop():
                res.stopped = "interrupted"
                break
            now = clock() - t0
            for spec in gen.due(now):
                req = make_request(spec)
                res.requests.append(req)
                sched.add(req)
            if now - last_series >= hooks.series_interval:
                hooks.series(engine_state(sched, now))
                last_series = now
            over = gen.issuing_over(now)
            if over and sched.idle:
                break
            if over and not draining:
                draining = True
                hooks.draining()
            if over and drain_timeout:
                deadline = now + drain_timeout if deadline is None else deadline
                if now >= deadline:
                    res.stopped = "drain-timeout"
                    break
            if max_steps and res.steps >= max_steps:
                res.stopped = "steps"
                break
            plan = sched.plan()
            if plan.empty:  # nothing queued or running: wait for the next arrival
                nxt = gen.next_arrival()
                if nxt is None:  # cannot happen with a consistent generator; never spin
                    res.stopped = "stalled"
                    break
                wake = nxt if deadline is None else min(nxt, deadline)
                sleep(max(0.0, wake - now))
                continue
            start = clock()
            outputs = engine.run(plan)
            end = clock()
            if last_end is not None and launched_ahead(engine):
                start = last_end  # the device began this step when the previous one ended
            last_end = end
            t = end - t0
            for req in sched.commit(plan, outputs, t):
                gen.on_finish(req.spec, t)
                hooks.finished(req)
            hooks.step(res.steps, (end - start) * 1000.0, len(outputs), plan, t)
            res.steps += 1
    except KeyboardInterrupt:
        res.stopped = "interrupted"
    res.end = clock() - t0
    hooks.series(engine_state(sched, res.end))
    res.unfinished = sched.unfinished()
    return res
