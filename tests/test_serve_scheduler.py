"""Continuous batching and the serving loop, with a fake engine (no torch): budgets, slots, stop rules."""

import math

import pytest

from workloads.engine.driver import Hooks, run_load
from workloads.engine.loadgen import ClosedLoop, LengthDist, OpenLoop, RequestSpec
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan, Scheduler


class FakeEngine:
    """Every step costs ``step_s`` on the fake clock; every decoding request and completed prefill gets a token."""

    def __init__(self, clock, step_s: float = 0.01) -> None:
        self.clock, self.step_s, self.plans = clock, step_s, []

    def run(self, plan: Plan):
        self.plans.append(plan)
        self.clock.now += self.step_s
        out = [(r, 1) for r in plan.decode]
        return out + [(r, 2) for r, s, n in plan.prefill if s + n == r.prompt_len]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def req(rid: int, p: int, o: int, t: float = 0.0) -> Request:
    return Request(RequestSpec(rid, p, o, t), list(range(p)))


def test_plan_budget_slots_and_fifo():
    s = Scheduler(max_batch=2, max_prefill_tokens=10, cache_len=64)
    for r in (req(0, 25, 3), req(1, 4, 3), req(2, 4, 3)):
        s.add(r)
    p = s.plan()  # request 0 takes the whole budget
    assert [(r.rid, st, n) for r, st, n in p.prefill] == [(0, 0, 10)] and not p.decode
    s.commit(p, [], 0.1)
    p = s.plan()
    assert [(r.rid, st, n) for r, st, n in p.prefill] == [(0, 10, 10)]
    s.commit(p, [], 0.2)
    p = s.plan()  # request 0 finishes its prompt, request 1 starts in the second slot
    assert [(r.rid, st, n) for r, st, n in p.prefill] == [(0, 20, 5), (1, 0, 4)]
    s.commit(p, [(r, 7) for r, _, _ in p.prefill], 0.3)
    p = s.plan()  # both decode; no slot for request 2
    assert [r.rid for r in p.decode] == [0, 1] and not p.prefill and len(s.waiting) == 1
    assert s.kv_tokens() == 25 + 4


def test_prompt_plus_output_must_fit_the_cache():
    s = Scheduler(1, 8, cache_len=10)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        s.add(req(0, 8, 3))


def test_slots_are_reused_and_every_request_finishes():
    clock = Clock()
    eng = FakeEngine(clock)
    sched = Scheduler(2, 16, 64)
    gen = ClosedLoop(3, LengthDist.parse("uniform:1,30"), LengthDist.parse("uniform:1,5"), seed=0, num_requests=12)
    finished = []
    res = run_load(eng, sched, gen, lambda spec: Request(spec, list(range(spec.prompt_len))), clock, clock.sleep,
                   Hooks(finished=finished.append))
    assert res.stopped == "drained" and len(finished) == 12 and not res.unfinished
    assert all(len(r.tokens) == r.output_len for r in finished)
    assert max(len(p.decode) for p in eng.plans) <= 2 and all(p.prefill_tokens <= 16 for p in eng.plans)
    assert res.steps == len(eng.plans)


def test_idle_loop_sleeps_until_the_next_arrival():
    clock = Clock()
    eng = FakeEngine(clock, step_s=0.001)
    gen = OpenLoop(2.0, 1.0, LengthDist.parse("fixed:3"), LengthDist.parse("fixed:2"), seed=0, num_requests=4)
    res = run_load(eng, Scheduler(4, 64, 16), gen, lambda s: Request(s, [0, 0, 0]), clock, clock.sleep)
    assert res.steps == 8  # prefill + one decode per request: no steps while idle
    for r in res.requests:
        assert r.token_times[0] == pytest.approx(r.arrival + 0.001)


def test_overload_with_a_drain_timeout_reports_unfinished_requests():
    clock = Clock()
    eng = FakeEngine(clock, step_s=0.05)
    gen = OpenLoop(math.inf, 1.0, LengthDist.parse("fixed:4"), LengthDist.parse("fixed:50"), seed=0, num_requests=6)
    series = []
    res = run_load(eng, Scheduler(2, 64, 64), gen, lambda s: Request(s, [0] * 4), clock, clock.sleep,
                   Hooks(series=series.append), drain_timeout=1.0)
    assert res.stopped == "drain-timeout" and res.end == pytest.approx(1.0, abs=0.06)
    assert len(res.unfinished) == 6 and len(res.requests) == 6
    assert series[0]["queue"] == 6 and series[-1]["running"] == 2 and 0 < series[-1]["kv_used"] <= 1


def test_step_cap():
    clock = Clock()
    gen = OpenLoop(math.inf, 1.0, LengthDist.parse("fixed:4"), LengthDist.parse("fixed:5"), seed=0, num_requests=2)
    res = run_load(FakeEngine(clock), Scheduler(2, 64, 64), gen, lambda s: Request(s, [0] * 4), clock, clock.sleep,
                   max_steps=3)
    assert res.stopped == "steps" and res.steps == 3 and len(res.unfinished) == 2
    assert all(len(r.tokens) == 3 for r in res.unfinished)
