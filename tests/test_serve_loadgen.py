"""The serving load generator: length distributions, arrival process, open and closed loop, replica shares."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.engine.loadgen import ClosedLoop, LengthDist, OpenLoop, arrival_times, prompt_tokens, request_lengths

U = LengthDist.parse("uniform:3,9")
F = LengthDist.parse("fixed:5")


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [("fixed:7", 7, 7), ("uniform:2,10", 2, 10), ("normal:100,10", 70, 130), ("normal:5,4", 1, 17),
     (" uniform:4,4 ", 4, 4)],
)
def test_length_forms_and_bounds(text, low, high):
    d = LengthDist.parse(text)
    assert (d.low, d.high) == (low, high)
    rng = np.random.default_rng(0)
    xs = [d.sample(rng) for _ in range(2000)]
    assert min(xs) >= low and max(xs) <= high
    if d.kind == "uniform" and high > low:
        assert set(xs) == set(range(low, high + 1))
    assert LengthDist.parse(str(d)) == d


@pytest.mark.parametrize("text", ["", "fixed", "fixed:0", "fixed:2.5", "uniform:5", "uniform:9,3", "uniform:0,3",
                                  "normal:0,1", "normal:5,-1", "poisson:4", "fixed:x", "uniform:1,inf"])
def test_bad_lengths_are_one_line_errors(text):
    with pytest.raises(ValueError) as exc:
        LengthDist.parse(text)
    assert "\n" not in str(exc.value) and repr(text) in str(exc.value)


@given(st.floats(1, 500), st.floats(0, 200), st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_normal_samples_stay_in_bounds(mean, std, seed):
    d = LengthDist("normal", mean, std)
    x = d.sample(np.random.default_rng(seed))
    assert 1 <= d.low <= x <= d.high


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_have_the_rate_and_the_gamma_shape(burstiness):
    gen = arrival_times(50.0, burstiness, seed=3)
    ts = np.array([next(gen) for _ in range(40001)])
    assert ts[0] == 0.0
    gaps = np.diff(ts)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)  # gamma CV


def test_infinite_rate_sends_everything_at_once():
    gen = OpenLoop(math.inf, 1.0, U, F, seed=0, num_requests=5)
    assert [s.arrival for s in gen.due(0.0)] == [0.0] * 5 and gen.issuing_over(0.0)


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_a_rate_that_is_not_positive_is_refused(rate):
    with pytest.raises(ValueError):
        OpenLoop(rate, 1.0, U, F, seed=0, num_requests=3)


def test_open_loop_is_seeded_and_independent_of_the_engine():
    a = OpenLoop(20.0, 1.0, U, F, seed=1, num_requests=30)
    b = OpenLoop(20.0, 1.0, U, F, seed=1, num_requests=30)
    early = a.due(0.5)  # asking at different moments never changes the schedule
    rest = a.due(1e9)
    assert early + rest == b.due(1e9)
    assert all(s.arrival <= 0.5 for s in early) and all(s.arrival > 0.5 for s in rest)
    assert [s.rid for s in early + rest] == list(range(30))
    assert OpenLoop(20.0, 1.0, U, F, seed=2, num_requests=30).due(1e9) != early + rest


def test_open_loop_stops_at_duration():
    gen = OpenLoop(100.0, 1.0, U, F, seed=0, duration=2.0)
    specs = gen.due(1e9)
    assert specs and max(s.arrival for s in specs) < 2.0 and gen.issuing_over(1e9)
    assert len(specs) == pytest.approx(200, rel=0.25)


@given(st.integers(1, 5), st.integers(1, 60), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_replicas_share_one_stream_each_request_once(replicas, n, seed):
    one = OpenLoop(10.0, 1.0, U, U, seed=seed, num_requests=n).due(1e12)
    shares = [OpenLoop(10.0, 1.0, U, U, seed=seed, num_requests=n, replica=r, replicas=replicas).due(1e12)
              for r in range(replicas)]
    assert sorted((s for part in shares for s in part), key=lambda s: s.rid) == one
    for r, part in enumerate(shares):
        assert all(s.rid % replicas == r for s in part)


def test_lengths_and_prompts_belong_to_the_request_id():
    assert request_lengths(7, 3, U, U) == request_lengths(7, 3, U, U)
    assert np.array_equal(prompt_tokens(7, 3, 12, 100), prompt_tokens(7, 3, 12, 100))
    p = prompt_tokens(7, 4, 500, 100)
    assert p.shape == (500,) and p.min() >= 0 and p.max() < 100


def _drive_closed(gen: ClosedLoop, service: float) -> list[tuple[int, float, float]]:
    """Serve every request in ``service`` seconds at infinite parallelism; (rid, arrival, finish)."""
    in_flight: list = []
    done = []
    now = 0.0
    while True:
        in_flight += [(s, now + service) for s in gen.due(now)]
        if not in_flight:
            assert gen.issuing_over(now)
            return done
        assert len(in_flight) <= gen.concurrency
        in_flight.sort(key=lambda x: x[1])
        spec, now = in_flight.pop(0)
        done.append((spec.rid, spec.arrival, now))
        gen.on_finish(spec, now)


def test_closed_loop_keeps_n_clients_busy():
    gen = ClosedLoop(3, U, F, seed=0, num_requests=10)
    done = _drive_closed(gen, 1.0)
    assert sorted(r for r, _, _ in done) == list(range(10))
    by_rid = {r: (a, f) for r, a, f in done}
    for rid in range(3, 10):  # each client's next request arrives the moment its previous one finished
        assert by_rid[rid][0] == by_rid[rid - 3][1]


def test_closed_loop_duration_and_replica_split():
    gen = ClosedLoop(4, U, F, seed=0, duration=3.5)
    done = _drive_closed(gen, 1.0)
    assert max(a for _, a, _ in done) < 3.5 and len(done) == 4 * 4
    shares = [ClosedLoop(4, U, F, seed=0, num_requests=9, replica=r, replicas=2) for r in range(2)]
    assert [g.clients for g in shares] == [[0, 2], [1, 3]]
    rids = sorted(r for g in shares for r, _, _ in _drive_closed(g, 1.0))
    assert rids == list(range(9))
